"""qwen_image_rl: Qwen-Image-2.0-RL post-training (GRPO + on-policy distillation) in JAX/Flax."""

from setuptools import find_packages, setup

RUNTIME = [
  "jax>=0.10.2",
  "flax>=0.12.8",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12.8",
  "transformers>=5.20",
  "tokenizers>=0.22",
  "ml_collections>=1.1",
  "tensorflow-datasets>=4.9.10",
  "tensorflow-cpu>=2.21",  # tfds Image features and clu's TensorBoard writer need TensorFlow.
  "tensorboard>=2.21",
  "clu>=0.0.12",
  "safetensors>=0.6",
  "numpy>=2.0",
  "pillow>=10",
  "absl-py>=2.1",
  "matplotlib>=3.8",  # arena and curve plots
  "aiohttp>=3.9",  # the judge server (qwen_image_rl.serve) and the remote reward client
]

TEST = [
  "pytest>=8",
  "pytest-xdist>=3.5",  # `make test` runs the suite on two workers
  "ruff>=0.17",  # lint and format (ruff.toml), run by `make test`
  # Exactly this torch: it is a CPU wheel on the machine's disk; any other version pulls CUDA.
  "torch==2.13.0",
  "diffusers==0.42.*",
  # tests/test_notebooks.py executes notebooks/*.ipynb in their short form.
  "nbclient>=0.10",
  "nbformat>=5.10",
  "ipykernel>=6.29",
  "matplotlib>=3.8",
]

setup(
  name="qwen_image_rl",
  version="0.1.0",
  description=__doc__,
  python_requires=">=3.11",
  packages=find_packages(include=["qwen_image_rl", "qwen_image_rl.*"]),
  install_requires=RUNTIME,
  extras_require={
    "tpu": ["jax[tpu]>=0.10.2"],
    "test": TEST,
  },
)
