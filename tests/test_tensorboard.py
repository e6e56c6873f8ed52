"""TensorBoard during RL, read back from the event files of a toy GRPO run (the grpo trainer
tests' tiny pipeline): per-reward and per-category reward histograms, advantage histograms, the
held-out scalars per category, the captioned group grid and the run's hparams."""

import glob
import io
import os

import numpy as np
import pytest
from test_grpo_trainer import _small_grpo, pipe_dir  # noqa: F401  (fixture)

from qwen_image_rl import metrics


def read_events(workdir):
  """{tag: [(step, plugin name, value)]} from every event file in `workdir` (TF2 summaries are
  tensors; hparams carry their data in the plugin metadata)."""
  import tensorflow as tf

  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        data = value.metadata.plugin_data.content if plugin == 'hparams' else None
        if value.HasField('tensor'):
          data = tf.make_ndarray(value.tensor) if data is None else data
        out.setdefault(value.tag, []).append((event.step, plugin, data))
  return out


def histogram_count(hist) -> float:
  """Samples in a TF2 histogram summary: [buckets, 3] (left edge, right edge, count)."""
  return float(np.asarray(hist)[:, 2].sum())


@pytest.mark.torch
def test_rl_run_writes_histograms_images_eval_by_category_and_hparams(pipe_dir, tmp_path):  # noqa: F811
  from qwen_image_rl import main

  workdir = str(tmp_path / 'run')
  c = _small_grpo(pipe_dir)
  c.total_steps = 2
  c.eval.num_edits = 0
  c.checkpoint.every = 2
  main.run(c, workdir)
  check_events(read_events(workdir), c)


def check_events(events, c):
  """The TensorBoard summaries of a 2-iteration run of config `c` with a final evaluation."""
  from PIL import Image
  from tensorboard.plugins.hparams import plugin_data_pb2

  batch = c.rl.group_size * c.rl.prompts_per_step

  # Per reward: one histogram over the batch and one per category, every logged iteration.
  for name in ('alignment', 'aesthetics', 'portrait'):
    overall = events[f'reward_hist/{name}/all']
    assert [step for step, _, _ in overall] == [1, 2] and overall[0][1] == 'histograms'
    hist = np.asarray(overall[-1][2])
    assert histogram_count(hist) == batch
    assert hist[:, 0].min() >= 0.0 and hist[:, 1].max() <= 1.0  # rewards in [0, 1]
    for step in (1, 2):  # the iteration's categories split its batch, whole groups each
      counts = [
        histogram_count(hist)
        for tag, entries in events.items()
        if tag.startswith(f'reward_hist/{name}/') and not tag.endswith('/all')
        for at, _, hist in entries
        if at == step
      ]
      assert sum(counts) == batch and all(n % c.rl.group_size == 0 for n in counts), counts
  advantage = np.asarray(events['advantage_hist/all'][-1][2])
  assert histogram_count(advantage) == batch and advantage[:, 0].min() < 0 < advantage[:, 1].max()
  assert [t for t in events if t.startswith('advantage_hist/') and not t.endswith('/all')]

  # Held-out scalars per category at the final evaluation.
  strict = [t for t in events if t.startswith('eval/t2i/strict/')]
  assert strict and all(events[t][-1][0] == 2 and 0 <= events[t][-1][2] <= 1 for t in strict)
  # and per check kind, item indices pooled (what keeps prompts from strict success)
  checks = [t for t in events if t.startswith('eval/t2i/check_pass/')]
  assert checks and all(0 <= events[t][-1][2] <= 1 for t in checks)
  assert 'eval/t2i/check_pass/general/shape/colour' in checks
  assert not any(c.isdigit() for t in checks for c in t.removeprefix('eval/t2i/check_pass/'))

  # The first group under its prompt, each image above its rewards and advantage.
  (step, plugin, encoded) = events['rollout/group'][-1]
  width, height = int(encoded[0]), int(encoded[1])
  image = np.asarray(Image.open(io.BytesIO(encoded[2])))
  assert step == 2 and plugin == 'images' and image.shape == (height, width, 3)
  size = c.data.image_size
  cell = max(size, 6 * len('align 0.123') + 4)  # widened for "name value" captions
  assert width == c.rl.group_size * cell and height > size + 11 * 4  # title + 4 caption lines
  assert (image[:11] < 128).any()  # the prompt is written on the title strip

  # The run's hparams, once, with the config's values.
  (hparams,) = events['_hparams_/session_start_info']
  info = plugin_data_pb2.HParamsPluginData.FromString(hparams[2]).session_start_info.hparams
  assert info['rl.group_size'].number_value == c.rl.group_size
  assert info['rl.objective'].string_value == c.rl.objective
  assert info['optim.lr'].number_value == pytest.approx(c.optim.lr)


def test_captioned_grid_and_flat_hparams():
  images = np.zeros((3, 20, 30, 3), np.uint8) + 255
  grid = metrics.captioned_grid(images, 'a red circle', [['0.5'], ['0.25'], ['1.0']])
  assert grid.shape == (11 + 2 + 20 + 11 + 2, 90, 3) and grid.dtype == np.uint8
  wide = metrics.captioned_grid(images[:2], 'a red circle', [['alignment 0.5'], []])
  assert wide.shape[1] == 2 * (6 * 13 + 4)  # cells widen to the longest caption
  with pytest.raises(ValueError, match='2 captions'):
    metrics.captioned_grid(images, 't', [[], []])
  flat = metrics.flat_hparams({'a': {'b': 1, 'c': (1, 2), 'd': None}, 'e': np.float32(0.5)})
  assert flat == {'a.b': 1, 'a.c': '(1, 2)', 'a.d': 'None', 'e': 0.5}
  assert metrics.flat_scalars('eval', {'x': {'k': 1}, 'y': 0.5, 'z': None, 's': 'no'}) == {
    'eval/x/k': 1.0,
    'eval/y': 0.5,
  }
