"""RL objectives, looked up by name (see `registry` for the interface an objective provides)."""
from qwen_image_rl.rl.objectives import awm  # noqa: F401  (registers 'awm')
from qwen_image_rl.rl.objectives import grpo  # noqa: F401  (registers 'grpo')
from qwen_image_rl.rl.objectives import nft  # noqa: F401  (registers 'nft')
from qwen_image_rl.rl.objectives.registry import RECORDS, Objective, get, names, register

__all__ = ["RECORDS", "Objective", "get", "names", "register"]
