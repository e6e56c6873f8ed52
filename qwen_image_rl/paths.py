"""One path layer for the files a run reads and writes: local paths and URLs (gs://, ram://).

Local paths go through `os` and `open`; any `scheme://` path goes through TensorFlow's gfile
(imported only then), which reaches Google Cloud Storage and TensorFlow's in-memory `ram://`
filesystem (what the tests use). Orbax checkpoints and TensorBoard events take such URLs
themselves. Writers that only know local files (safetensors, `save_pretrained`) write into
`staged_dir`, which uploads the tree when the path is a URL; readers that only know local files
(the safetensors loaders) read from `local_copy`, which downloads a URL's tree once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any


def is_url(path) -> bool:
  return "://" in os.fspath(path)


def _gfile():
  import tensorflow as tf  # Lazy: TensorFlow is heavy and local runs never need it.

  return tf.io.gfile


def join(path, *parts) -> str:
  return os.path.join(os.fspath(path), *parts)  # '/'-joined on POSIX, URLs included


def exists(path) -> bool:
  return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
  return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return exists(path) and not isdir(path)


def makedirs(path) -> None:
  if is_url(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
  """Entry names (no trailing '/'), sorted."""
  names = _gfile().listdir(path) if is_url(path) else os.listdir(path)
  return sorted(n.rstrip("/") for n in names)


def open_file(path, mode: str = "r"):
  """A file object for a local path or a URL (text or binary per `mode`)."""
  if is_url(path):
    return _gfile().GFile(path, mode)
  return open(path, mode)


def read_text(path) -> str:
  with open_file(path) as f:
    return f.read()


def read_json(path) -> Any:
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def write_text_atomic(path, text: str) -> str:
  """Write `text` to `path` so that readers never see half a file.

  Local: a temporary file renamed over the target. URL: one object upload (GCS objects appear
  whole); the parent directory is created first.
  """
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    makedirs(parent)
  if is_url(path):
    with _gfile().GFile(path, "w") as f:
      f.write(text)
    return path
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def write_json_atomic(path, data: Any, **dump_kwargs) -> str:
  return write_text_atomic(path, json.dumps(data, **dump_kwargs))


def upload_tree(local_dir: str, remote_dir: str) -> None:
  """Copy a local directory tree to a URL (files overwritten)."""
  gfile = _gfile()
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = remote_dir if rel == "." else join(remote_dir, rel)
    gfile.makedirs(target)
    for name in files:
      gfile.copy(os.path.join(root, name), join(target, name), overwrite=True)


@contextlib.contextmanager
def staged_dir(path) -> Iterator[str]:
  """A local directory to write `path`'s contents into: `path` itself when local; for a URL a
  temporary directory uploaded to `path` on a clean exit (and removed either way)."""
  path = os.fspath(path)
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    yield path
    return
  local = tempfile.mkdtemp(prefix="qwen_image_rl_stage_")
  try:
    yield local
    upload_tree(local, path)
  finally:
    shutil.rmtree(local, ignore_errors=True)


def download_tree(remote_dir: str, local_dir: str) -> None:
  """Copy a URL's directory tree into a local directory (files overwritten)."""
  gfile = _gfile()
  for root, _, files in gfile.walk(remote_dir):
    rel = os.path.relpath(root.rstrip("/"), remote_dir.rstrip("/"))
    target = local_dir if rel == "." else os.path.join(local_dir, rel)
    os.makedirs(target, exist_ok=True)
    for name in files:
      gfile.copy(join(root, name), os.path.join(target, name), overwrite=True)


def local_copy(path, cache_dir: str | None = None) -> str:
  """A local directory with `path`'s tree: `path` itself when local; for a URL a copy in
  `cache_dir` (default $QWEN_IMAGE_RL_CACHE, else the system temp dir), downloaded once.

  Each process downloads into a scratch directory and renames it into place, so no reader
  sees a half-written copy and concurrent processes on one host do not collide.
  FileNotFoundError when the URL is not a directory.
  """
  path = os.fspath(path)
  if not is_url(path):
    return path
  if not isdir(path):
    raise FileNotFoundError(f"{path}: no such directory")
  cache_dir = cache_dir or os.environ.get("QWEN_IMAGE_RL_CACHE") or tempfile.gettempdir()
  root = os.path.join(cache_dir, "qwen_image_rl_remote")
  local = os.path.join(root, hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16])
  if os.path.isdir(local):
    return local
  os.makedirs(root, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix="download_", dir=root)
  print(f"paths: downloading {path} -> {local}", flush=True)
  try:
    download_tree(path, scratch)
    os.rename(scratch, local)
  except OSError:
    if not os.path.isdir(local):  # not another process having finished first
      raise
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return local


def find_export(path, name: str, holds: Callable[[str], bool]) -> str | None:
  """The export `path` names: `path` itself or a workdir's export/<name>, the first whose
  directory `holds` accepts, as a local directory (local_copy); None when neither does."""
  if not path:
    return None
  for candidate in (path, join(path, "export", name)):
    if holds(candidate):
      return local_copy(candidate)
  return None
