"""qwen_image_rl: RL post-training of Qwen-Image diffusion models in JAX/Flax."""

from qwen_image_rl import host_memory as _host_memory

__version__ = "0.1.0"

# Before any jitted step allocates: see host_memory.py (XLA:CPU speed; opt out by env var).
MALLOC_TUNED = _host_memory.tune_malloc()
