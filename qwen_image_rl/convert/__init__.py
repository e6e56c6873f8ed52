"""transformers / diffusers checkpoints <-> Flax params."""

from qwen_image_rl.convert.qwen2_5_vl import load_qwen2_5_vl, save_qwen2_5_vl

__all__ = ["load_qwen2_5_vl", "save_qwen2_5_vl"]
