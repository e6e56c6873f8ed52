"""qwen_image_rl: RL post-training of Qwen-Image diffusion models in JAX/Flax."""

__version__ = "0.1.0"
