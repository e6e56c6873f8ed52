"""GRPO on the tiny random pipeline with its alignment reward scored by a judge server process.

A server killed and restarted in the middle of an RL iteration: the run ends with exactly the
weights of an undisturbed run (same rewards, so same updates). A server that stays down: the run
stops with the remote reward's error and the checkpoints committed before stay intact.
"""

import os
import sys
import threading
import time

import numpy as np
import pytest
from judge_servers import judge_servers  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import grpo_t2i as grpo_t2i_config  # noqa: E402

CATEGORIES = ('general', 'typography', 'portrait', 'landscape')


@pytest.fixture(scope='module')
def pipe_dir(tmp_path_factory):
  from tests import tiny_reference

  _, path = tiny_reference.build_t2i(str(tmp_path_factory.mktemp('tiny_pipe')))
  return path


def remote_config(pipe_dir, base_url, total_steps=2, **remote_kwargs):
  c = grpo_t2i_config.get_config('tiny')
  c.init_from = pipe_dir
  c.total_steps = total_steps
  c.data.update(dict(image_size=32, num_prompts=16, max_text_tokens=48))
  c.rl.update(dict(group_size=4, prompts_per_step=2, rollout_chunks=2, num_steps=4))
  c.rl.timesteps.update(dict(num_train=2, first_m=3))
  c.eval.update(dict(num_t2i=0, num_edits=0, every=0, at_start=False))
  c.checkpoint.update(dict(every=1, async_save=False))
  c.log.update(dict(every=1, images_every=0))
  c.rewards.names = ('remote_alignment', 'aesthetics')
  c.rewards.kwargs = {
    'remote_alignment': dict(
      base_url=base_url, backoff_base_s=0.05, backoff_max_s=1.0, **remote_kwargs
    )
  }
  c.rl.category_weights = {cat: {'remote_alignment': 0.7, 'aesthetics': 0.3} for cat in CATEGORIES}
  return c


def exported_transformer(workdir):
  from qwen_image_rl.convert.safetensors_io import load_state_dict

  return load_state_dict(os.path.join(workdir, 'export', 'pipeline', 'transformer'))


def requests_served(server) -> int:
  import json
  import urllib.request

  try:
    with urllib.request.urlopen(server.url + '/health', timeout=2) as response:
      return json.loads(response.read())['requests']
  except OSError:
    return 0


@pytest.mark.torch
@pytest.mark.slow
def test_server_restart_mid_iteration_changes_nothing(pipe_dir, tmp_path, judge_servers):  # noqa: F811
  from qwen_image_rl import main

  steady = judge_servers.start('--judge=oracle')
  main.run(remote_config(pipe_dir, steady.base_url, total_steps=1), str(tmp_path / 'steady'))
  flaky = judge_servers.start_fault('--mode=delay', '--delay_s=0.05')
  restarts = []

  def crash_once_scoring_started():
    deadline = time.monotonic() + 600
    while requests_served(flaky) < 2 and time.monotonic() < deadline:
      time.sleep(0.005)
    flaky.kill()  # in the middle of the first chunk's scoring (8 samples, 0.05 s each)
    time.sleep(0.3)
    flaky.start()
    restarts.append(time.monotonic())

  thread = threading.Thread(target=crash_once_scoring_started, daemon=True)
  thread.start()
  main.run(
    remote_config(
      pipe_dir,
      flaky.base_url,
      total_steps=1,
      max_concurrency=2,
      max_retries=12,
      max_consecutive_failures=1000,
    ),
    str(tmp_path / 'flaky'),
  )
  thread.join(60)
  assert restarts, 'the server was never killed'
  want, got = exported_transformer(tmp_path / 'steady'), exported_transformer(tmp_path / 'flaky')
  assert sorted(want) == sorted(got)
  for name in want:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
  base = exported_transformer_base(pipe_dir)
  moved = sum(not np.array_equal(np.asarray(base[n]), np.asarray(want[n])) for n in want)
  assert moved > 0  # the runs trained: equal weights are not the untouched base


def exported_transformer_base(pipe_dir):
  from qwen_image_rl.convert.safetensors_io import load_state_dict

  return load_state_dict(os.path.join(pipe_dir, 'transformer'))


@pytest.mark.torch
@pytest.mark.slow
def test_judge_down_stops_the_run_with_checkpoints_intact(pipe_dir, tmp_path, judge_servers):  # noqa: F811
  from qwen_image_rl import main
  from qwen_image_rl.checkpoint import committed_steps
  from qwen_image_rl.rewards.async_pipeline import RewardWorkerError

  server = judge_servers.start('--judge=oracle')
  workdir = str(tmp_path / 'down')
  checkpoints = os.path.join(workdir, 'checkpoints')

  def kill_after_first_checkpoint():
    deadline = time.monotonic() + 600
    while not committed_steps(checkpoints) and time.monotonic() < deadline:
      time.sleep(0.01)
    server.kill()

  thread = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
  thread.start()
  config = remote_config(
    pipe_dir, server.base_url, total_steps=6, max_retries=1, max_consecutive_failures=3
  )
  with pytest.raises(RewardWorkerError, match='3 consecutive samples failed'):
    main.run(config, workdir)
  thread.join(60)
  steps = committed_steps(checkpoints)
  assert steps and steps[0] == 1 and steps[-1] < 6, steps
