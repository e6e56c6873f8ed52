"""qwen_image_rl: RL post-training of Qwen-Image diffusion models in JAX/Flax.

Importing the package changes nothing process-wide: the entry points (`main`, `demo`,
`grpo_ablation`, the benchmarks) tune glibc malloc for XLA:CPU themselves.
"""

__version__ = "0.1.0"
