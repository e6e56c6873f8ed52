"""RL objectives, looked up by name (see `registry` for the interface an objective provides)."""

from qwen_image_rl.rl.objectives import (
  awm,
  grpo,
  nft,
  raft,
)
from qwen_image_rl.rl.objectives.registry import RECORDS, Objective, get, names, register

__all__ = ["RECORDS", "Objective", "get", "names", "register"]
