"""Logical axis names -> mesh axes, and the helpers that turn annotations into shardings.

Every parameter and activation in our models carries logical axis names; one table (the
config's `mesh.logical_axis_rules`) maps them onto the physical mesh axes `data`, `fsdp` and
`tensor`. Changing the parallelism is a config change.

Parameter axes:  embed (model width), mlp (MLP hidden), heads (flattened heads*head_dim),
                 kv (per-head dim), modulation (AdaLN 6*d), vocab, joint_embed (text-encoder
                 width fed to the DiT), conv_in / conv_out (VAE channels), norm (scales).
Activation axes: act_batch, act_length, act_embed, act_heads, act_kv, act_mlp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_image_rl.parallel.multihost import host_to_global

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
  # Activations: batch over data-parallel axes, heads/mlp over tensor. The order (fsdp, data)
  # is deliberate: with ('data', 'fsdp') on a mesh where data, fsdp and tensor are all > 1,
  # XLA's CPU SPMD partitioner swaps batch shards in the masked joint attention of the MMDiT
  # (tests/test_mmdit.py::test_batch_sharded_masked_forward_matches_one_device).
  ("act_batch", ("fsdp", "data")),
  ("act_length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv", None),
  ("act_mlp", "tensor"),
  # Parameters: FSDP on the model width, Megatron-style tensor split on heads and MLP.
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("modulation", "tensor"),
  ("vocab", "tensor"),
  ("joint_embed", None),
  ("conv_in", None),
  ("conv_out", "fsdp"),
  ("norm", None),
)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules) -> P:
  """PartitionSpec for one array's logical axis names under `rules`."""
  if logical_axes is None:
    return P()
  return nn.logical_to_mesh_axes(tuple(logical_axes), tuple(rules))


def _fit_spec_to_shape(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes from dimensions they do not divide (tiny configs, odd sizes).

  An uneven split would fail at placement time; replicating that dimension is always valid and
  only costs memory, which only matters at sizes where the dims do divide.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    size = 1
    for ax in axes_tuple:
      if dim % (size * mesh.shape[ax]) == 0:
        kept.append(ax)
        size *= mesh.shape[ax]
    fitted.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*fitted)


def logical_sharding(shape, logical_axes, mesh: Mesh, rules) -> NamedSharding:
  spec = logical_to_spec(logical_axes, rules)
  return NamedSharding(mesh, _fit_spec_to_shape(spec, shape, mesh))


def get_logical_axes(abstract_tree):
  """Logical axis names of every leaf of a tree that may hold `nn.LogicallyPartitioned` boxes."""
  return nn.get_partition_spec(abstract_tree)


def tree_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of (possibly boxed) abstract arrays.

  `abstract_tree` is typically `jax.eval_shape(model.init, ...)`: leaves are ShapeDtypeStructs,
  some wrapped in `nn.LogicallyPartitioned`. Unannotated leaves are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shapes = nn.meta.unbox(abstract_tree)

  def one(leaf, spec):
    logical = tuple(spec) if spec is not None else ()
    mesh_spec = nn.logical_to_mesh_axes(logical, tuple(rules)) if logical else P()
    return NamedSharding(mesh, _fit_spec_to_shape(mesh_spec, np.shape(leaf), mesh))

  return jax.tree.map(one, shapes, specs, is_leaf=lambda x: isinstance(x, P))


def _place(x, sharding):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)  # already global: a reshard
  return host_to_global(x, sharding)


def shard_tree(tree, shardings):
  """Place a tree of arrays on the mesh (host arrays are copied, device arrays resharded).

  Every process must hold the same host values (weights loaded from the same files, or drawn
  from the same seed); each places only its own shards.
  """
  return jax.tree.map(_place, tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim_or_shape, rules=DEFAULT_LOGICAL_AXIS_RULES) -> NamedSharding:
  """Shard the leading (batch) dimension over the data-parallel axes.

  Given a shape, mesh axes that do not divide the batch are dropped (see `_fit_spec_to_shape`):
  a batch of 4 on 8 data-parallel devices is split 4 ways and replicated 2 ways.
  """
  shape = (ndim_or_shape,) if isinstance(ndim_or_shape, int) else tuple(ndim_or_shape)
  ndim = shape[0] if len(shape) == 1 and isinstance(ndim_or_shape, int) else len(shape)
  spec = logical_to_spec(("act_batch",) + (None,) * (ndim - 1), rules)
  if not isinstance(ndim_or_shape, int):
    spec = _fit_spec_to_shape(spec, shape, mesh)
  return NamedSharding(mesh, spec)
