"""Read and write diffusers/transformers-style safetensors directories.

A component directory (e.g. `transformer/`) holds either one `*.safetensors` file or several
shards plus an index `*.safetensors.index.json` whose `weight_map` names the shard of each key.
Errors name the directory and the offending keys, so a broken checkpoint is diagnosed at once.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import numpy as np

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


def load_state_dict(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a component directory as float32/original-dtype numpy arrays."""
  from safetensors.numpy import load_file

  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint component directory not found: {directory}")
  names = sorted(os.listdir(directory))
  index_files = [n for n in names if n.endswith(".safetensors.index.json")]
  if index_files:
    index = read_json(os.path.join(directory, index_files[0]))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{directory}/{index_files[0]}: no 'weight_map'")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
      raise CheckpointError(f"{directory}: shard files named in the index are missing: "
                            f"{_fmt_keys(missing)}")
  else:
    shards = [n for n in names if n.endswith(".safetensors")]
    if not shards:
      raise CheckpointError(f"{directory}: no *.safetensors file and no index")
  state = {}
  for shard in shards:
    path = os.path.join(directory, shard)
    try:
      tensors = _load_any_dtype(path)
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f"{path}: cannot read safetensors ({e})") from e
    state.update(tensors)
  if index_files:
    absent = set(weight_map) - set(state)
    if absent:
      raise CheckpointError(f"{directory}: keys in the index but in no shard: {_fmt_keys(absent)}")
  return state


def _load_any_dtype(path: str) -> dict[str, np.ndarray]:
  """safetensors.numpy cannot represent bfloat16; read those through ml_dtypes."""
  import ml_dtypes
  from safetensors import safe_open

  out = {}
  with safe_open(path, framework="np") as f:
    for key in f.keys():
      try:
        out[key] = f.get_tensor(key)
      except (TypeError, ValueError):
        out[key] = _read_bf16(path, key, ml_dtypes)
  return out


def _read_bf16(path: str, key: str, ml_dtypes) -> np.ndarray:
  with open(path, "rb") as fh:
    n = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(n))
    info = header[key]
    start, end = info["data_offsets"]
    fh.seek(8 + n + start)
    buf = fh.read(end - start)
  if info["dtype"] != "BF16":
    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
  return np.frombuffer(buf, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


def check_state_dict(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                     where: str, ignore_unexpected: Iterable[str] = ()) -> None:
  """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches."""
  ignore = tuple(ignore_unexpected)
  missing = set(expected) - set(state)
  unexpected = {k for k in set(state) - set(expected) if not k.startswith(ignore)}
  wrong = {k: (tuple(state[k].shape), tuple(expected[k]))
           for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k])}
  problems = []
  if missing:
    problems.append(f"missing keys: {_fmt_keys(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_fmt_keys(unexpected)}")
  if wrong:
    problems.append("wrong shapes: " + _fmt_keys(
        f"{k} (checkpoint {got}, model {want})" for k, (got, want) in wrong.items()))
  if problems:
    raise CheckpointError(f"{where}: " + "; ".join(problems))


def save_state_dict(state: Mapping[str, np.ndarray], directory: str, *,
                    filename: str = "diffusion_pytorch_model.safetensors",
                    max_shard_bytes: int = 5 * 2**30) -> None:
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
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values()))},
             "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
    tmp = os.path.join(directory, filename + ".index.json.tmp")
    with open(tmp, "w") as f:
      json.dump(index, f, indent=2)
    os.replace(tmp, os.path.join(directory, filename + ".index.json"))
