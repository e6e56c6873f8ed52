"""Metrics for the trainers: TensorBoard scalars and image grids, results JSON, progress lines.

Everything goes through one `MetricLogger` per run. Only host 0 writes event files and results;
other hosts log scalars to their own absl logs, so multi-host code can call it unconditionally.

  logger = MetricLogger(workdir, total_steps=1000, progress_every=50)
  logger.scalars(step, {"train/loss": loss})
  logger.histograms(step, {"rollout/reward/aesthetics": rewards})   # finite values only
  logger.images(step, {"samples": image_grid(batch_uint8, ncols=4)})
  logger.hparams(config)                   # once per run: the TensorBoard HPARAMS view
  logger.progress(step)                    # every progress_every steps: steps/s and ETA
  logger.write_results("eval_1000", {...})  # workdir/results/eval_1000.json, atomically
  logger.close()
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from qwen_image_rl import config_lib, paths

_RESULT_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def image_grid(images, ncols: int, *, pad: int = 0, pad_value: int = 0) -> np.ndarray:
  """Tile a batch [N, H, W, C] into one [rows*H + (rows-1)*pad, ncols*W + ..., C] image.

  Missing cells of the last row are filled with `pad_value`.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"image_grid: expected [N, H, W, C], got shape {images.shape}")
  if ncols < 1:
    raise ValueError(f"image_grid: ncols={ncols} must be >= 1")
  n, h, w, c = images.shape
  ncols = min(ncols, max(n, 1))
  nrows = max(1, math.ceil(n / ncols))
  grid = np.full(
    (nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad, c), pad_value, dtype=images.dtype
  )
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = r * (h + pad), col * (w + pad)
    grid[y : y + h, x : x + w] = images[i]
  return grid


def captioned_grid(images, title: str, captions) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one row of the images under a `title` strip, each above its caption
  lines (e.g. a prompt's rollouts with their rewards). Cells widen to fit the longest caption
  line; text in PIL's built-in bitmap font (6 x 11 pixels a character)."""
  from PIL import Image, ImageDraw, ImageFont

  images = _check_image("captioned_grid", images)
  n, h, w = images.shape[:3]
  captions = [[str(t) for t in c] for c in captions]
  if len(captions) != n:
    raise ValueError(f"captioned_grid: {n} images but {len(captions)} captions")
  char, line = 6, 11
  cell = max([w] + [char * len(t) + 4 for c in captions for t in c])
  title_lines = textwrap.wrap(title, max(1, (n * cell - 4) // char)) or [""]
  top = line * len(title_lines) + 2
  rows = max((len(c) for c in captions), default=0)
  canvas = Image.new("RGB", (n * cell, top + h + line * rows + 2), (255, 255, 255))
  draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
  for i, text in enumerate(title_lines):
    draw.text((2, 1 + i * line), text, fill=(0, 0, 0), font=font)
  for i in range(n):
    canvas.paste(Image.fromarray(images[i][..., :3]), (i * cell + (cell - w) // 2, top))
    for j, text in enumerate(captions[i]):
      draw.text((i * cell + 2, top + h + 1 + j * line), text, fill=(0, 0, 0), font=font)
  return np.asarray(canvas, np.uint8)


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """A (nested) config -> {"a.b.c": bool | int | float | str} for the hparams plugin, which
  takes only those types: None, tuples, lists and other values become their str()."""
  return {name: _hparam_value(v) for name, v in config_lib.flatten(config, prefix).items()}


def _hparam_value(value) -> bool | int | float | str:
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  return str(value)


def flat_scalars(prefix: str, nested: Mapping[str, Any]) -> dict[str, float]:
  """{"a": {"b": 0.5}, "c": 1} -> {"PREFIX/a/b": 0.5, "PREFIX/c": 1.0}; non-numbers dropped."""
  out = {}
  for key, value in nested.items():
    name = f"{prefix}/{key}"
    if isinstance(value, Mapping):
      out.update(flat_scalars(name, value))
    elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
      out[name] = float(value)
  return out


def _check_image(name: str, value) -> np.ndarray:
  value = np.asarray(value)
  if value.dtype != np.uint8:
    raise ValueError(
      f"images[{name!r}]: expected uint8 pixels, got {value.dtype}; "
      "convert with np.clip(x * 255, 0, 255).astype(np.uint8)"
    )
  if value.ndim == 3:
    value = value[None]
  if value.ndim != 4 or value.shape[-1] not in (1, 3, 4):
    raise ValueError(f"images[{name!r}]: expected [N, H, W, 3] or [H, W, 3], got {value.shape}")
  return value


def _to_json(value: Any):
  """numpy / jax scalars and arrays -> plain Python for json."""
  if isinstance(value, Mapping):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(value).tolist()
  return value


def write_json_atomic(path: str, data: Mapping[str, Any]) -> str:
  """Write JSON to a temp file in the same folder, then rename: readers never see half a file.
  A gs:// path is written as one object (see `paths.write_text_atomic`)."""
  text = json.dumps(_to_json(data), indent=2, sort_keys=True, allow_nan=True)
  if paths.is_url(path):
    return paths.write_text_atomic(path, text + "\n")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


class MetricLogger:
  """TensorBoard writer (clu), results JSON and wall-clock progress reporting for one run."""

  def __init__(
    self, workdir: str, *, total_steps: int, progress_every: int = 100, is_host0: bool | None = None
  ):
    if paths.exists(workdir) and not paths.isdir(workdir):
      raise ValueError(f"MetricLogger: workdir {workdir} is a file, expected a directory")
    if progress_every < 1:
      raise ValueError(f"MetricLogger: progress_every={progress_every} must be >= 1")
    self.workdir = workdir
    self.total_steps = int(total_steps)
    self.progress_every = int(progress_every)
    self.is_host0 = jax.process_index() == 0 if is_host0 is None else bool(is_host0)
    if self.is_host0:
      paths.makedirs(workdir)
      from clu import metric_writers  # Lazy: clu imports TensorFlow.

      self._writer = metric_writers.create_default_writer(workdir)
    else:
      self._writer = _LogOnlyWriter()
    self._last_report: tuple[int, float] | None = None  # (step, wall time)
    self._start_time = time.time()

  # -- TensorBoard ---------------------------------------------------------------------------

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    clean = {}
    for name, value in values.items():
      arr = np.asarray(value)
      if arr.size != 1:
        raise ValueError(f"scalars[{name!r}]: expected a scalar, got shape {arr.shape}")
      clean[name] = float(arr.reshape(()))
    self._writer.write_scalars(int(step), clean)

  def images(self, step: int, images: Mapping[str, Any]) -> None:
    """name -> uint8 [N, H, W, 3] (N images under one tag) or [H, W, 3] (e.g. an image_grid)."""
    checked = {name: _check_image(name, value) for name, value in images.items()}
    if self.is_host0:
      self._writer.write_images(int(step), checked)

  def histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: int = 30) -> None:
    """name -> values (any shape, flattened); non-finite values are left out and an array with
    none left is skipped (a histogram of NaN is no histogram)."""
    clean = {}
    for name, value in arrays.items():
      arr = np.asarray(value, np.float64).reshape(-1)
      arr = arr[np.isfinite(arr)]
      if arr.size:
        clean[name] = arr
    if clean and self.is_host0:
      self._writer.write_histograms(int(step), clean, dict.fromkeys(clean, num_buckets))

  def hparams(self, config: Mapping[str, Any]) -> None:
    """The run's configuration, flattened (`flat_hparams`), for TensorBoard's HPARAMS view:
    written once per run so ablation runs compare in one table."""
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    if self.is_host0:
      self._writer.write_hparams(flat_hparams(config))

  # -- results -------------------------------------------------------------------------------

  def results_path(self, name: str) -> str:
    if name.endswith(".json"):
      name = name[: -len(".json")]
    if not _RESULT_NAME.match(name):
      raise ValueError(f"write_results: name {name!r} must be letters, digits, '_', '-', '.'")
    return os.path.join(self.workdir, "results", f"{name}.json")

  def write_results(self, name: str, data: Mapping[str, Any]) -> str | None:
    """Atomically write workdir/results/<name>.json (host 0 only). Returns its path."""
    path = self.results_path(name)
    if not self.is_host0:
      return None
    write_json_atomic(path, data)
    logging.info("Wrote %s", path)
    return path

  # -- progress ------------------------------------------------------------------------------

  def progress(self, step: int) -> str | None:
    """Every `progress_every` steps print "step N/T, X steps/s, ETA ..."; return the line.

    The rate is measured over the steps since the previous report (wall clock), so the first
    call only starts the clock and compile time does not skew later estimates.
    """
    step = int(step)
    now = time.time()
    if self._last_report is None:
      self._last_report = (step, now)
      return None
    last_step, last_time = self._last_report
    if step - last_step < self.progress_every and step < self.total_steps:
      return None
    self._last_report = (step, now)
    elapsed = max(now - last_time, 1e-9)
    rate = (step - last_step) / elapsed
    remaining = max(self.total_steps - step, 0)
    eta = remaining / rate if rate > 0 else float("inf")
    line = (
      f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%), "
      f"{rate:.3g} steps/s, elapsed {_fmt_seconds(now - self._start_time)}, "
      f"ETA {_fmt_seconds(eta)}"
    )
    self._writer.write_scalars(step, {"perf/steps_per_sec": rate})
    if self.is_host0:
      print(line, flush=True)
    logging.info(line)
    return line

  # -- lifecycle -----------------------------------------------------------------------------

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _LogOnlyWriter:
  """The writer of every process but 0: scalars to its own absl log, nothing to the workdir.

  It does not import clu, whose `metric_writers` package imports TensorFlow: several seconds of
  CPU at the start of every non-primary host of a pod, for event files it never writes.
  """

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _fmt_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
