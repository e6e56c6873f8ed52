"""Read and write diffusers/transformers-style safetensors directories.

A component directory (e.g. `transformer/`) holds either one `*.safetensors` file or several
shards plus an index `*.safetensors.index.json` whose `weight_map` names the shard of each key.
Errors name the directory and the offending keys, so a broken checkpoint is diagnosed at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from absl import logging

from qwen_image_rl.convert import placement
from qwen_image_rl.errors import CheckpointError


def _fmt_keys(keys: Iterable[str], limit: int = 20) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise CheckpointError(f"missing file: {path}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


# safetensors dtype names -> numpy dtypes (bfloat16 and float8 through ml_dtypes).
_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U64": np.uint64,
  "U32": np.uint32,
  "U16": np.uint16,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in the file
  nbytes: int


def _shard_files(directory: str) -> tuple[list[str], dict | None]:
  """(shard file names, the index's weight_map or None) of a component directory."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint component directory not found: {directory}")
  names = sorted(os.listdir(directory))
  index_files = [n for n in names if n.endswith(".safetensors.index.json")]
  if not index_files:
    shards = [n for n in names if n.endswith(".safetensors")]
    if not shards:
      raise CheckpointError(f"{directory}: no *.safetensors file and no index")
    return shards, None
  index = read_json(os.path.join(directory, index_files[0]))
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{directory}/{index_files[0]}: no 'weight_map'")
  shards = sorted(set(weight_map.values()))
  missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
  if missing:
    raise CheckpointError(
      f"{directory}: shard files named in the index are missing: {_fmt_keys(missing)}"
    )
  return shards, weight_map


def _read_header(path: str) -> dict[str, TensorInfo]:
  """The tensor table of one safetensors file, validated against the file size."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if n < 2 or 8 + n > size:
      raise CheckpointError(f"{path}: cannot read safetensors (bad header length)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: cannot read safetensors (header is not JSON: {e})") from e
  header.pop("__metadata__", None)
  table = {}
  for key, info in header.items():
    dtype = _DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info!r}")
    shape = tuple(int(d) for d in info["shape"])
    start, end = (int(x) for x in info["data_offsets"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if end - start != nbytes or 8 + n + end > size:
      raise CheckpointError(
        f"{path}: tensor {key} {shape} {info['dtype']} does not fit its "
        f"data offsets {start}..{end} (file of {size} bytes)"
      )
    table[key] = TensorInfo(path, np.dtype(dtype), shape, 8 + n + start, nbytes)
  return table


class SafetensorsReader:
  """The tensors of a component directory, read one at a time into fresh host memory.

  Only the headers are read up front. `read(key)` uses a plain positioned file read rather than
  a memory map: mapped pages of a 40 GB checkpoint would stay resident (and count as the
  process's memory) for as long as the file is open, which defeats loading one tensor at a time.
  """

  def __init__(self, directory: str):
    self.directory = directory
    shards, weight_map = _shard_files(directory)
    self._table: dict[str, TensorInfo] = {}
    for shard in shards:
      self._table.update(_read_header(os.path.join(directory, shard)))
    if weight_map is not None:
      absent = set(weight_map) - set(self._table)
      if absent:
        raise CheckpointError(
          f"{directory}: keys in the index but in no shard: {_fmt_keys(absent)}"
        )

  def keys(self) -> list[str]:
    return sorted(self._table)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: info.shape for k, info in self._table.items()}

  def nbytes(self) -> int:
    return sum(info.nbytes for info in self._table.values())

  def read(self, key: str) -> np.ndarray:
    info = self._table.get(key)
    if info is None:
      raise CheckpointError(f"{self.directory}: no tensor {key}")
    out = placement.aligned_empty(info.shape, info.dtype)  # placeable without a copy
    with open(info.path, "rb") as f:
      f.seek(info.offset)
      got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != info.nbytes:
      raise CheckpointError(
        f"{info.path}: tensor {key} is truncated ({got} of {info.nbytes} bytes)"
      )
    return out


class DictSource:
  """A state dict in memory behind the reader's interface (`shapes`, `read`)."""

  def __init__(self, state: Mapping[str, Any]):
    self._state = state

  def keys(self) -> list[str]:
    return sorted(self._state)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in self._state.items()}

  def read(self, key: str) -> np.ndarray:
    value = self._state[key]
    if hasattr(value, "detach"):  # a torch tensor; .float() also handles bfloat16
      return value.detach().cpu().float().numpy()
    return np.asarray(value)


def load_state_dict(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a component directory as numpy arrays in their stored dtype."""
  reader = SafetensorsReader(directory)
  return {key: reader.read(key) for key in reader.keys()}


def known_config(config: Mapping[str, Any], fields, where: str) -> dict[str, Any]:
  """`config` without keys the model does not have, warning about them as diffusers does.

  diffusers' `ConfigMixin.extract_init_dict` drops every key that is not an `__init__` argument
  with a warning (the released Qwen-Image transformer config carries `pooled_projection_dim`);
  keys starting with '_' are bookkeeping and dropped silently.
  """
  unknown = sorted(k for k in config if k not in fields and not k.startswith("_"))
  if unknown:
    logging.warning(
      "%s: config keys %s are not used by the model and are ignored (as diffusers ignores them).",
      where,
      unknown,
    )
  return {k: v for k, v in config.items() if k not in unknown}


def _shape(value) -> tuple[int, ...]:
  return tuple(getattr(value, "shape", value))  # an array or a bare shape


def check_state_dict(
  state: Mapping[str, Any],
  expected: Mapping[str, tuple],
  where: str,
  ignore_unexpected: Iterable[str] = (),
) -> None:
  """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches.

  `state` maps keys to arrays or to bare shapes (a reader's `shapes()`).
  """
  ignore = tuple(ignore_unexpected)
  missing = set(expected) - set(state)
  unexpected = {k for k in set(state) - set(expected) if not k.startswith(ignore)}
  wrong = {
    k: (_shape(state[k]), tuple(expected[k]))
    for k in set(state) & set(expected)
    if _shape(state[k]) != tuple(expected[k])
  }
  problems = []
  if missing:
    problems.append(f"missing keys: {_fmt_keys(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_fmt_keys(unexpected)}")
  if wrong:
    problems.append(
      "wrong shapes: "
      + _fmt_keys(f"{k} (checkpoint {got}, model {want})" for k, (got, want) in wrong.items())
    )
  if problems:
    raise CheckpointError(f"{where}: " + "; ".join(problems))


def save_state_dict(
  state: Mapping[str, np.ndarray],
  directory: str,
  *,
  filename: str = "diffusion_pytorch_model.safetensors",
  max_shard_bytes: int = 5 * 2**30,
) -> None:
  """Write tensors as one file, or as shards plus an index when larger than `max_shard_bytes`.

  Files are written under temporary names and renamed, so an interrupted save never leaves a
  directory that looks complete.
  """
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(state):
    arr = np.ascontiguousarray(state[key])
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = arr
    size += arr.nbytes
  stem = filename[: -len(".safetensors")]
  if len(shards) == 1:
    names = [filename]
  else:
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    tmp = os.path.join(directory, name + ".tmp")
    save_file(shard, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, name))
  if len(shards) > 1:
    index = {
      "metadata": {"total_size": int(sum(a.nbytes for a in state.values()))},
      "weight_map": {k: n for n, shard in zip(names, shards) for k in shard},
    }
    tmp = os.path.join(directory, filename + ".index.json.tmp")
    with open(tmp, "w") as f:
      json.dump(index, f, indent=2)
    os.replace(tmp, os.path.join(directory, filename + ".index.json"))
