"""Device mesh from the config, and multi-host initialisation."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.experimental.mesh_utils
import numpy as np
from absl import logging
from jax.sharding import Mesh

from qwen_image_rl.parallel.partitioning import MESH_AXES


def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fill the single -1 axis so that the product equals `num_devices`; validate the rest."""
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh: unknown mesh axes {sorted(unknown)}; known: {list(MESH_AXES)}")
  sizes = {ax: int(axis_sizes.get(ax, 1)) for ax in MESH_AXES}
  fill = [ax for ax, n in sizes.items() if n == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {fill}")
  for ax, n in sizes.items():
    if n == 0 or n < -1:
      raise ValueError(f"config.mesh.{ax}={n}: sizes must be positive or -1")
  known = int(np.prod([n for n in sizes.values() if n != -1]))
  if fill:
    if num_devices % known:
      raise ValueError(
        f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
        f"({ {a: n for a, n in sizes.items() if n != -1} })"
      )
    sizes[fill[0]] = num_devices // known
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(
      f"config.mesh: axes {sizes} multiply to "
      f"{int(np.prod(list(sizes.values())))}, but there are {num_devices} devices"
    )
  return sizes


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = resolve_mesh_shape(axis_sizes, len(devices))
  shape = tuple(sizes[ax] for ax in MESH_AXES)
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # Simulated CPU devices and odd topologies: plain row-major order.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def maybe_initialize_distributed(mode: str = "auto") -> bool:
  """Call `jax.distributed.initialize()` on multi-host runs (TPU pods); a no-op on one host.

  mode: 'auto' initialises when the environment names a coordinator or a multi-host TPU slice,
  'always' forces it, 'never' skips it.
  """
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"config.distributed={mode!r}: expected 'auto', 'always' or 'never'")
  if mode == "never":
    return False
  multi_host_env = any(
    os.environ.get(k)
    for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")
  )
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  multi_host_env = multi_host_env or ("," in tpu_hosts)
  if mode == "always" or multi_host_env:
    logging.info("Initialising jax.distributed (multi-host).")
    jax.distributed.initialize()
    return True
  return False
