"""Place checkpoint tensors straight into their target shardings, one tensor at a time.

A loader reads one tensor into host memory, and `put` hands each addressable device only its
own slice (`jax.make_array_from_callback`): no device ever holds a full copy of a sharded
parameter, each host of a pod reads a tensor whole but copies out and transfers only its own
devices' shards, and the host copy is dropped before the next tensor is read, so host memory
stays near the largest tensor plus (on CPU, where device memory is host memory) the model.

Scanned models keep all layers of a parameter in one stacked leaf [layers, ...]. `StackedLeaf`
fills only this host's shards of that leaf, layer by layer, so the loader reads the checkpoint
one stacked leaf at a time (all layers of `img_mod`, then all of `to_q`, ...).

`sharding=None` means plain host numpy arrays (the unsharded default of some loaders).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

_ALIGNMENT = 64  # XLA:CPU adopts host buffers aligned to this without copying them


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised C-contiguous array whose data is 64-byte aligned.

  numpy's own allocations are only 16-byte aligned, so `jax.device_put` onto a CPU device would
  copy them: one more copy of every tensor in host memory while it is placed.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
  offset = (-raw.ctypes.data) % _ALIGNMENT
  return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _copy(value: np.ndarray, dtype) -> np.ndarray:
  out = aligned_empty(value.shape, dtype)
  out[...] = value
  return out


def put(value: np.ndarray, sharding: Sharding | None, dtype) -> jax.Array | np.ndarray:
  """`value` (any host layout, e.g. a transposed view) as an array of `dtype` with `sharding`.

  Only the slices that this process's devices hold are copied out of `value` and converted.
  """
  if sharding is None:
    return _copy(value, dtype)
  return jax.make_array_from_callback(
    value.shape, sharding, lambda index: _copy(value[index], dtype)
  )


class StackedLeaf:
  """A [layers, ...] parameter assembled one layer at a time, only as this host's shards.

  Each addressable device's shard is a host buffer of the shard's shape; `set` copies the slice
  of a layer that each buffer holds (devices holding the same slice share one buffer), and
  `result` moves the buffers onto their devices. Host memory is this host's part of one stacked
  leaf plus the layer in flight, never the whole stack, and nothing is compiled (on XLA:CPU a
  jitted in-place update costs ~5 MB of compiler memory per distinct leaf).
  """

  def __init__(self, shape, sharding: Sharding | None, dtype):
    self.shape, self.sharding, self.dtype = tuple(shape), sharding, np.dtype(dtype)
    self._filled = np.zeros(self.shape[0], bool)
    if sharding is None:
      self._indices = {None: tuple(slice(None) for _ in self.shape)}
    else:
      self._indices = sharding.addressable_devices_indices_map(self.shape)
    self._buffers = {}  # index key -> host buffer of that shard
    for index in self._indices.values():
      key = _index_key(index, self.shape)
      if key not in self._buffers:
        self._buffers[key] = aligned_empty([stop - start for start, stop in key], self.dtype)

  def set(self, layer: int, value: np.ndarray) -> None:
    """Write layer `layer` (any host layout, e.g. a transposed view)."""
    if tuple(value.shape) != self.shape[1:]:
      raise ValueError(
        f"layer {layer}: shape {tuple(value.shape)}, stacked leaf expects {self.shape[1:]}"
      )
    for key, buffer in self._buffers.items():
      (start, stop), rest = key[0], key[1:]
      if start <= layer < stop:
        buffer[layer - start] = value[tuple(slice(a, b) for a, b in rest)]
    self._filled[layer] = True

  def result(self):
    """The stacked array (every layer must have been written); the host buffers are released."""
    if not self._filled.all():
      raise ValueError(
        f"stacked leaf {self.shape}: layers {np.flatnonzero(~self._filled)} were never written"
      )
    buffers, self._buffers = self._buffers, {}
    if self.sharding is None:
      return buffers[_index_key(self._indices[None], self.shape)]
    arrays = [
      jax.device_put(buffers[_index_key(index, self.shape)], device)
      for device, index in self._indices.items()
    ]
    return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)


def _index_key(index, shape) -> tuple[tuple[int, int], ...]:
  """A hashable (start, stop) per dimension of a shard's index (a tuple of slices)."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def single_device(tree):
  """The default placement of device-array loaders: every leaf on the first local device."""
  sharding = SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda _: sharding, tree)
