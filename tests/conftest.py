"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

from tests.xla_flags import cpu_xla_flags

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cpu_xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity tests compare against PyTorch in float32; keep XLA from using bf16 dots on CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# AOT tests load libtpu, whose lockfile lets one process per machine hold it; pytest-xdist
# workers and test subprocesses are several processes that never touch a TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The entry points restart themselves with glibc's huge-page tunable unless it is set
# (qwen_image_rl/host_memory.py); set here, the workers and the tests' subprocesses start with it.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "slow: longer checks (scale, end-to-end); CI runs them in short form"
  )
  config.addinivalue_line(
    "markers", "torch: needs the PyTorch reference (torch, diffusers, transformers)"
  )
  config.addinivalue_line(
    "markers",
    "multihost: 2 processes x 4 devices (jax.distributed over gloo), three runs each",
  )
  config.addinivalue_line(
    "markers",
    "multihost_full: the multi-host jobs beyond CI's short form (the grpo job); `make test` "
    "deselects them, `pytest -m multihost` runs all",
  )
