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


_COORDINATOR_VARS = (
  "JAX_COORDINATOR_ADDRESS",
  "COORDINATOR_ADDRESS",
  "MEGASCALE_COORDINATOR_ADDRESS",
)


def on_tpu_vm() -> bool:
  """Whether this machine has TPU chips (a Cloud TPU VM), found without touching a backend.

  jax.distributed.initialize() with no arguments finds the other hosts of a TPU VM pod from the
  GCE metadata server, and on a single-host TPU VM it simply sees one process.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  try:
    from jax._src import hardware_utils  # the check jax itself runs before starting libtpu

    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # pragma: no cover - a jax without this helper: treat as no TPU
    return False
  return chips > 0


def distributed_args(coordinator_address=None, num_processes=None, process_id=None) -> dict:
  """jax.distributed.initialize's explicit arguments; all three or none (then auto-detected)."""
  given = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  if all(v is None for v in given.values()):
    return {}
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(
      f"--coordinator_address, --num_processes and --process_id go together; "
      f"missing {['--' + k for k in missing]}"
    )
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  if ":" not in coordinator_address:
    raise ValueError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT")
  return given


def maybe_initialize_distributed(mode: str = "auto", **args) -> bool:
  """Call `jax.distributed.initialize()` on multi-host runs (TPU pods); a no-op on one host.

  mode: 'auto' initialises when given explicit `args` (coordinator_address, num_processes,
  process_id), when the environment names a coordinator or a multi-host TPU slice (GKE), or on
  a Cloud TPU VM (pods find their peers from the metadata server); 'always' forces it, 'never'
  skips it. On CPU (tests: several processes on one machine) cross-process collectives use gloo.
  """
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"config.distributed={mode!r}: expected 'auto', 'always' or 'never'")
  args = distributed_args(**args)
  if mode == "never" or jax.distributed.is_initialized():
    return False
  multi_host_env = any(os.environ.get(k) for k in _COORDINATOR_VARS)
  multi_host_env = multi_host_env or ("," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
  if not (mode == "always" or args or multi_host_env or on_tpu_vm()):
    return False
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("Initialising jax.distributed (%s).", args or "auto-detected cluster")
  jax.distributed.initialize(**args)
  logging.info("Process %d of %d.", jax.process_index(), jax.process_count())
  return True
