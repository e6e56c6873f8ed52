"""Fail (or warn) when the data-parallel mesh axes do not divide a batch dimension.

`batch_sharding` drops every mesh axis that does not divide the batch (so odd tiny batches still
run): a batch of 96 on data=32 x fsdp=8 is split 32 ways and replicated 8 ways, silently
repeating the same work on 8x the chips. Trainers call `check_batches` once, before compiling,
with the config fields that set batch dimensions; the message names the field and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from absl import logging
from jax.sharding import Mesh

BATCH_AXIS = "act_batch"  # the logical axis of every batch dimension (see partitioning.py)
MODES = ("error", "warn", "off")


class BatchShardingError(ValueError):
  """A batch dimension is not divisible by the mesh axes that shard it."""


def batch_mesh_axes(rules) -> tuple[str, ...]:
  """The mesh axes the logical batch axis maps to under `rules` (in rule order)."""
  for name, axes in rules:
    if name == BATCH_AXIS:
      if axes is None:
        return ()
      return (axes,) if isinstance(axes, str) else tuple(axes)
  return ()


def _kept_axes(batch: int, axes: Sequence[str], sizes: Mapping[str, int]) -> list[str]:
  """The axes `batch_sharding` keeps: greedily, each one that still divides the batch."""
  kept, product = [], 1
  for ax in axes:
    if batch % (product * sizes[ax]) == 0:
      kept.append(ax)
      product *= sizes[ax]
  return kept


def batch_problem(field: str, batch: int, mesh_sizes: Mapping[str, int], rules) -> str | None:
  """A message naming `field` and the fix when the batch axes do not divide `batch`, else None."""
  axes = [ax for ax in batch_mesh_axes(rules) if mesh_sizes.get(ax, 1) > 1]
  degree = math.prod(mesh_sizes[ax] for ax in axes)
  if batch % degree == 0:
    return None
  kept = _kept_axes(batch, axes, mesh_sizes)
  split = math.prod(mesh_sizes[ax] for ax in kept)
  dropped = [f"{ax}={mesh_sizes[ax]}" for ax in axes if ax not in kept]
  larger = -(-batch // degree) * degree
  smaller = (batch // degree) * degree
  fixes = [
    f"set {field} to a multiple of {degree} (e.g. {larger}"
    + (f" or {smaller})" if smaller else ")")
  ]
  fixes.append(
    f"or change config.mesh so that the batch axes {axes} multiply to a divisor of {batch}"
  )
  return (
    f"{field}={batch} is not divisible by the data-parallel mesh axes "
    f"{ {ax: mesh_sizes[ax] for ax in axes} } (product {degree}): the batch would be split "
    f"{split} ways and replicated {degree // split}x over {', '.join(dropped)}, every "
    f"replica doing the same work. Fix: " + " ".join(fixes) + "."
  )


def check_batches(
  batches: Mapping[str, int], mesh: Mesh | Mapping[str, int], rules, mode: str = "error"
) -> list[str]:
  """Check every {config field name: batch size}; raise (mode 'error') or log ('warn').

  Returns the problem messages (empty when every batch divides).
  """
  if mode not in MODES:
    raise ValueError(f"batch check mode={mode!r}: expected one of {list(MODES)}")
  sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else {k: int(v) for k, v in mesh.items()}
  if mode == "off":
    return []
  problems = []
  for field, batch in batches.items():
    if not isinstance(batch, int) or batch <= 0:
      raise BatchShardingError(f"{field}={batch!r}: a batch size must be a positive integer")
    problem = batch_problem(field, batch, sizes, rules)
    if problem:
      problems.append(problem)
  if problems and mode == "error":
    raise BatchShardingError("\n".join(problems))
  for problem in problems:
    logging.warning("%s", problem)
  return problems


def config_batches(config, fields: Sequence[str]) -> dict[str, int]:
  """{field: value} for dotted config fields; 'a.b*c.d' names a product of two fields
  (e.g. prompts per step times group size = rollouts per step)."""
  out = {}
  for spec in fields:
    value = 1
    for path in spec.split("*"):
      node = config
      for part in path.strip().split("."):
        if part not in node:
          raise BatchShardingError(f"config.{path.strip()} does not exist (batch check)")
        node = node[part]
      value *= int(node)
    out["config." + spec.replace("*", " * ")] = value
  return out
