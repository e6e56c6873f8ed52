"""Pre-encoded prompts: encode the RL prompt set once, roll out without a text encoder.

On a tiny random diffusers pipeline: the encode command writes the pool's prompts and the
negative prompt; a run that reads them loads no text encoder, and its prompt pool and rollout
chunk (latents, transitions and decoded images) equal the live encoder's exactly. Bad files and
mismatched configs fail with ConfigError naming the problem.
"""

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import grpo_t2i as grpo_t2i_config  # noqa: E402


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
  from tests import tiny_reference

  _, path = tiny_reference.build_t2i(str(tmp_path_factory.mktemp("tiny_pipe")))
  return path


def _config(pipe_dir, encoded=""):
  c = grpo_t2i_config.get_config("tiny")
  c.init_from = pipe_dir
  c.data.update(dict(image_size=32, num_prompts=8, max_text_tokens=48, encoded_prompts=encoded))
  c.rl.update(dict(group_size=2, prompts_per_step=2, rollout_chunks=2, num_steps=3))
  c.rl.timesteps.update(dict(num_train=2, first_m=3))
  c.eval.update(dict(num_t2i=0, num_edits=0))
  return c


def _rollout_chunk(config):
  import jax

  from qwen_image_rl import parallel
  from qwen_image_rl.rl import iteration

  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  s = iteration.setup(config, mesh, parallel.as_rules(config.logical_axis_rules))
  params = s.pipe.transformer_params
  key = jax.random.key(3)
  index = s.roller.prompt_indices(0)[: s.roller.chunk]
  res, images = s.roller.rollout_chunk(params, key, index, s.roller.train_steps(key, 0), 0)
  return s, jax.device_get(res), images


@pytest.mark.torch
def test_rollouts_with_pre_encoded_prompts_equal_the_live_encoder(pipe_dir, tmp_path):
  from qwen_image_rl.rl.encode_prompts import encode_config_prompts

  path = str(tmp_path / "prompts.npz")
  live_config = _config(pipe_dir)
  assert encode_config_prompts(live_config, path) == 8 + 1  # the pool and the negative prompt
  live, live_res, live_images = _rollout_chunk(live_config)
  pre, pre_res, pre_images = _rollout_chunk(_config(pipe_dir, encoded=path))

  assert live.pipe.text_encoder is not None
  assert pre.pipe.text_encoder is None and pre.pipe.text_encoder_params is None
  np.testing.assert_array_equal(pre.pool.cond, live.pool.cond)
  np.testing.assert_array_equal(pre.pool.mask, live.pool.mask)
  assert pre.pool.prompts == live.pool.prompts
  np.testing.assert_array_equal(pre.roller.neg_cond, live.roller.neg_cond)
  np.testing.assert_array_equal(pre.roller.neg_mask, live.roller.neg_mask)
  assert np.abs(live.pool.cond).max() > 0  # real embeddings, not zeros
  for name in ("final_latents", "latents_t", "latents_next", "log_probs"):
    np.testing.assert_array_equal(getattr(pre_res, name), getattr(live_res, name))
  np.testing.assert_array_equal(pre_images, live_images)


def test_encoded_prompt_file_round_trip_and_errors(tmp_path):
  from qwen_image_rl.config_lib import ConfigError
  from qwen_image_rl.pipelines.prompt_encoding import EncodedPrompts, save_encoded_prompts
  from qwen_image_rl.rl import config_checks, prompts

  rng = np.random.default_rng(0)
  mask = np.zeros((3, 10), np.int32)
  for row, n in enumerate((4, 2, 6)):
    mask[row, :n] = 1
  cond = rng.normal(size=(3, 10, 5)).astype(np.float32) * mask[..., None]
  path = str(tmp_path / "p.npz")
  save_encoded_prompts(path, ["a", "b", "c"], cond, mask)
  got_cond, got_mask = EncodedPrompts(path).lookup(["c", "a"], 10)
  np.testing.assert_array_equal(got_cond, cond[[2, 0]])
  np.testing.assert_array_equal(got_mask, mask[[2, 0]])
  with np.load(path) as data:
    assert data["cond"].shape == (3, 6, 5)  # stored up to the longest prompt's end

  with pytest.raises(ValueError, match="not zero"):
    save_encoded_prompts(str(tmp_path / "bad.npz"), ["a", "b", "c"], cond + 1, mask)
  with pytest.raises(ValueError, match="distinct"):
    save_encoded_prompts(str(tmp_path / "dup.npz"), ["a", "a", "c"], cond, mask)

  c = _config("unused", encoded=path)
  c.data.max_text_tokens = 10
  with pytest.raises(ConfigError, match="not in the file.*'zz'"):
    prompts.conditioning(c, None, ["a", "zz"], 10)
  with pytest.raises(ConfigError, match="encoded with 10 text tokens.*asks for 12"):
    prompts.conditioning(c, None, ["a"], 12)
  (tmp_path / "junk.npz").write_text("not an npz")
  c.data.encoded_prompts = str(tmp_path / "junk.npz")
  with pytest.raises(ConfigError, match="cannot read"):
    prompts.conditioning(c, None, ["a"], 10)
  c.data.encoded_prompts = str(tmp_path / "missing.npz")
  with pytest.raises(ConfigError, match="no such file"):
    prompts.conditioning(c, None, ["a"], 10)

  c.data.encoded_prompts = path
  c.eval.num_t2i = 4
  with pytest.raises(ConfigError, match="evaluation encodes its own"):
    config_checks.check_encoded_prompts(c)
  c.eval.num_t2i = 0
  c.rl.task = "edit"
  with pytest.raises(ConfigError, match="rl.task='t2i'"):
    config_checks.check_encoded_prompts(c)
