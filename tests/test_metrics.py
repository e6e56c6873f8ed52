"""MetricLogger: TensorBoard scalars/images read back via tensorboard's reader; results JSON."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from qwen_image_rl.metrics import MetricLogger, image_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_events(workdir):
  acc = event_accumulator.EventAccumulator(
    workdir,
    size_guidance={
      event_accumulator.TENSORS: 0,
      event_accumulator.SCALARS: 0,
      event_accumulator.IMAGES: 0,
    },
  )
  acc.Reload()
  return acc


def _scalar_series(acc, tag):
  """(step, value) pairs, whether the writer stored them as scalars or as TF2 tensors."""
  if tag in acc.Tags()["scalars"]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]
  return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def _decoded_images(acc, tag):
  """step -> list of decoded uint8 images (TF2 image summaries: [width, height, png...])."""
  out = {}
  for e in acc.Tensors(tag):
    blobs = tensor_util.make_ndarray(e.tensor_proto)
    out[e.step] = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[2:]]
  return out


def test_image_grid_layout():
  images = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
  grid = image_grid(images, ncols=2, pad=1, pad_value=255)
  assert grid.shape == (3 * 2 + 2, 2 * 3 + 1, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[0:2, 0:3], images[0])
  np.testing.assert_array_equal(grid[0:2, 4:7], images[1])
  np.testing.assert_array_equal(grid[6:8, 0:3], images[4])
  assert (grid[6:8, 4:7] == 255).all()  # Missing cell.
  assert (grid[2, :] == 255).all() and (grid[:, 3] == 255).all()  # Separators.
  assert image_grid(images, ncols=8).shape == (2, 15, 3)


def test_scalars_images_and_results_roundtrip(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  rng = np.random.default_rng(0)
  batch = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
  grid = image_grid(batch, ncols=3)

  logger = MetricLogger(workdir, total_steps=10, progress_every=5, is_host0=True)
  losses = {step: 1.0 / (step + 1) for step in range(1, 11)}
  for step in range(1, 11):
    logger.scalars(step, {"train/loss": np.float32(losses[step]), "train/lr": 1e-3})
    logger.progress(step)
  logger.images(4, {"samples/grid": grid, "samples/batch": batch[:2]})
  results = {
    "step": 10,
    "t2i": {"overall": np.float32(0.25), "by_category": {"general": 0.5}},
    "curve": np.arange(3),
    "n_samples": np.int64(6),
  }
  path = logger.write_results("eval_10", results)
  logger.flush()
  logger.close()

  # Progress lines: the first call starts the clock; then at steps 6 and 10 (the last step).
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
  assert [l.split()[1] for l in lines] == ["6/10", "10/10"], lines
  assert all("steps/s" in l and "ETA" in l for l in lines)

  acc = _load_events(workdir)
  loss = _scalar_series(acc, "train/loss")
  assert [s for s, _ in loss] == list(range(1, 11))
  np.testing.assert_allclose([v for _, v in loss], [losses[s] for s in range(1, 11)], rtol=1e-6)
  assert [v for _, v in _scalar_series(acc, "train/lr")] == pytest.approx([1e-3] * 10)
  assert [s for s, _ in _scalar_series(acc, "perf/steps_per_sec")] == [6, 10]

  grids = _decoded_images(acc, "samples/grid")
  assert list(grids) == [4] and len(grids[4]) == 1
  np.testing.assert_array_equal(grids[4][0], grid)  # PNG is lossless.
  np.testing.assert_array_equal(np.stack(_decoded_images(acc, "samples/batch")[4]), batch[:2])

  assert path == os.path.join(workdir, "results", "eval_10.json")
  with open(path) as f:
    loaded = json.load(f)
  assert loaded == {
    "step": 10,
    "t2i": {"overall": 0.25, "by_category": {"general": 0.5}},
    "curve": [0, 1, 2],
    "n_samples": 6,
  }
  assert os.listdir(os.path.join(workdir, "results")) == ["eval_10.json"]  # No temp files left.


def test_errors_and_non_host0(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    MetricLogger(str(a_file), total_steps=1)

  logger = MetricLogger(str(tmp_path / "run"), total_steps=3, is_host0=True)
  with pytest.raises(ValueError, match="uint8"):
    logger.images(0, {"x": np.zeros((4, 4, 3), np.float32)})
  with pytest.raises(ValueError, match="N, H, W, 3"):
    logger.images(0, {"x": np.zeros((4, 4), np.uint8)})
  with pytest.raises(ValueError, match="scalar"):
    logger.scalars(0, {"x": np.zeros(3)})
  with pytest.raises(ValueError, match="name"):
    logger.write_results("../escape", {})
  logger.close()

  other = tmp_path / "other_host"
  logger = MetricLogger(str(other), total_steps=3, is_host0=False)
  logger.scalars(1, {"a": 1.0})
  logger.images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
  assert logger.write_results("r", {"a": 1}) is None
  logger.close()
  assert not other.exists()  # Only host 0 touches the workdir.


def test_non_primary_logger_does_not_import_tensorflow(tmp_path):
  """clu's writers import TensorFlow (seconds per host at start-up); hosts other than 0 write no
  event files and must not pay for it."""
  code = (
    "import sys\n"
    "from qwen_image_rl.metrics import MetricLogger\n"
    f"logger = MetricLogger({str(tmp_path / 'run')!r}, total_steps=2, is_host0=False)\n"
    "logger.scalars(1, {'a': 1.0}); logger.progress(1); logger.progress(2); logger.close()\n"
    "assert 'tensorflow' not in sys.modules and 'clu' not in sys.modules, 'imported'\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True)
  assert done.returncode == 0, done.stderr.decode()[-2000:]
  assert not (tmp_path / "run").exists()
