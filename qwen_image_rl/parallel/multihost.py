"""Moving data between host memory and arrays that span several processes (multi-host pods).

On one host every jax.Array is fully addressable and these are thin wrappers. On a pod each
process holds only the shards on its own chips:
  - host data that every process computes identically (a batch that is a pure function of
    (seed, step), initial weights) becomes a global array with `host_to_global`: each process
    places only its own shards, with no cross-host check that all hosts hold the same value
    (which `jax.device_put` of a host array does by all-gathering it);
  - a global array comes back to host memory with `to_host`, which gathers across processes
    (a collective: every process must call it, in the same order);
  - per-sample host work (reward scoring) is split with `process_rows` and joined with
    `gather_rows`.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_primary() -> bool:
  """Process 0: the one that writes config, results and exports."""
  return jax.process_index() == 0


def host_to_global(x, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array with `sharding` from a host array every process holds in full."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_process_local_data(sharding, x, x.shape)


def _leaf_to_host(x):
  if not isinstance(x, jax.Array):
    return x
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree):
  """Every jax.Array leaf as a numpy array on every process (gathered where it spans hosts).

  A collective when any leaf spans processes: all processes must call it together.
  """
  return jax.tree.map(_leaf_to_host, tree)


def process_rows(n: int) -> slice:
  """This process's contiguous share of n rows (all of them when n does not split evenly)."""
  count = jax.process_count()
  if count == 1 or n % count:
    return slice(0, n)
  per = n // count
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
  """The n rows that `process_rows(n)` split over processes, joined in order on every process."""
  local = np.asarray(local)
  if process_rows(n) == slice(0, n):
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


_barriers = itertools.count()


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Wait until every process gets here (a no-op on one process).

  A coordination-service barrier, not a device collective: a process that is still compiling
  (its peers loaded the programs from the persistent cache) is waited for here, with a long
  timeout, instead of inside the first collective, whose set-up on CPU (gloo) gives up after 30 s.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost as orbax_multihost

  orbax_multihost.sync_global_processes(f"{name}_{next(_barriers)}", timeout=timeout_s)
