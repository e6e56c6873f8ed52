"""The grpo and curate trainers end to end at toy size, on a tiny random diffusers pipeline.

Covers: a T2I run producing eval results (with training reward means), checkpoints and a
loadable exported pipeline whose weights moved; an edit run with CFG in the objective and a KL
reference; NaN rewards (3 skipped iterations in a row -> NonFiniteError, last good checkpoint
intact); bad configs failing with ConfigError before any compile; the full-size configs'
validation and abstract shapes; curation writing a prompt file; exact resume after SIGKILL.
"""

import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import curate as curate_config  # noqa: E402
from configs import grpo_edit as grpo_edit_config  # noqa: E402
from configs import grpo_t2i as grpo_t2i_config  # noqa: E402
from tests import kill_and_resume  # noqa: E402


def _shrink(c, pipe_dir):
  c.init_from = pipe_dir
  c.total_steps = 3
  c.data.update(dict(image_size=32, num_prompts=16, max_text_tokens=48))
  c.rl.update(dict(group_size=4, prompts_per_step=2, rollout_chunks=2, num_steps=4))
  c.rl.timesteps.update(dict(num_train=2, first_m=3))
  c.eval.update(
    dict(
      num_t2i=4,
      num_edits=2,
      image_size=32,
      num_steps=2,
      batch_size=4,
      max_text_tokens=48,
      every=0,
      at_start=False,
    )
  )
  c.checkpoint.update(dict(every=1, async_save=False))
  c.log.update(dict(every=1, images_every=2))
  return c


def _small_grpo(pipe_dir, task="t2i"):
  module = grpo_t2i_config if task == "t2i" else grpo_edit_config
  return _shrink(module.get_config("tiny"), pipe_dir)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
  from tests import tiny_reference

  _, path = tiny_reference.build_t2i(str(tmp_path_factory.mktemp("tiny_pipe")))
  return path


def _transformer_params(directory):
  from qwen_image_rl.convert.safetensors_io import load_state_dict

  return load_state_dict(os.path.join(directory, "transformer"))


@pytest.mark.torch
def test_grpo_t2i_end_to_end(pipe_dir, tmp_path):
  from qwen_image_rl import main
  from qwen_image_rl.checkpoint import committed_steps
  from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline

  workdir = str(tmp_path / "t2i")
  c = _small_grpo(pipe_dir)
  c.eval.num_edits = 0  # a T2I policy's eval can skip the edit set
  results = main.run(c, workdir)
  with open(os.path.join(workdir, "results", "eval_3.json")) as f:
    saved = json.load(f)
  assert saved["step"] == 3 and saved["n_samples"] == 4 and "edit" not in saved
  assert saved["rewards_window"] == 3  # training rewards averaged over the last iterations
  assert saved["t2i"]["overall"] == pytest.approx(results["t2i"]["overall"])
  for name in ("alignment", "aesthetics", "portrait"):
    assert 0.0 <= saved["rewards"][f"{name}/mean"] <= 1.0, saved["rewards"]
  assert 0.0 <= saved["rewards"]["composite/mean"] <= 1.0
  assert 3 in committed_steps(os.path.join(workdir, "checkpoints"))
  export = os.path.join(workdir, "export", "pipeline")
  before, after = _transformer_params(pipe_dir), _transformer_params(export)
  assert set(before) == set(after)
  moved = max(
    float(np.abs(np.asarray(after[k], np.float32) - np.asarray(before[k], np.float32)).max())
    for k in before
  )
  assert 1e-6 < moved < 1.0, moved  # three small clipped updates
  pipe = QwenImagePipeline.from_pretrained(export)
  images = pipe(prompt=["a red circle"], num_inference_steps=2, height=32, width=32, seed=0)
  assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


@pytest.mark.slow
@pytest.mark.torch
def test_grpo_edit_cfg_in_objective_with_kl(pipe_dir, tmp_path):
  from qwen_image_rl import main

  c = _small_grpo(pipe_dir, "edit")
  c.total_steps = 2
  c.rl.cfg_mode = "both"
  c.rl.kl_beta = 0.01
  c.rl.micro_batch_size = 4
  c.rl.async_rewards = False
  c.eval.num_t2i = 0
  workdir = str(tmp_path / "edit")
  main.run(c, workdir)
  assert os.path.isfile(os.path.join(workdir, "export", "pipeline", "model_index.json"))
  with open(os.path.join(workdir, "export", "pipeline", "model_index.json")) as f:
    assert json.load(f)["_class_name"] == "QwenImageEditPipeline"


_NAN_STATE = {"calls": 0}


def _register_nan_reward():
  from qwen_image_rl.rewards.base import RewardFn
  from qwen_image_rl.rewards.registry import known_rewards, register_reward

  if "k_test_nan_after" in known_rewards():
    return

  @register_reward("k_test_nan_after")
  class NanAfter(RewardFn):  # pylint: disable=unused-variable
    """Finite for the first 2 batches (one iteration of 2 chunks), NaN afterwards."""

    name, names = "k_test_nan_after", ("k_test_nan_after",)

    def score(self, batch):
      _NAN_STATE["calls"] += 1
      value = batch.images.mean(axis=(1, 2, 3)) / 255.0
      return {self.name: value if _NAN_STATE["calls"] <= 2 else np.full_like(value, np.nan)}


@pytest.mark.torch
def test_nan_rewards_stop_after_three_and_keep_last_checkpoint(pipe_dir, tmp_path):
  from qwen_image_rl import main
  from qwen_image_rl.checkpoint import committed_steps
  from qwen_image_rl.trainers.common import NonFiniteError

  _register_nan_reward()
  _NAN_STATE["calls"] = 0
  c = _small_grpo(pipe_dir)
  c.total_steps = 8
  c.eval.num_t2i = 0
  c.rewards.names = ("alignment", "k_test_nan_after")
  c.rl.category_weights = {
    cat: {"alignment": 0.5, "k_test_nan_after": 0.5}
    for cat in ("general", "typography", "portrait", "landscape")
  }
  workdir = str(tmp_path / "nan")
  with pytest.raises(NonFiniteError, match="3 consecutive iterations"):
    main.run(c, workdir)
  assert committed_steps(os.path.join(workdir, "checkpoints")) == [1]
  assert _NAN_STATE["calls"] == 8  # iterations 1-4, two chunks each; 2-4 skipped


def _expect_config_error(c, match):
  from qwen_image_rl import config_lib, trainers

  with pytest.raises(config_lib.ConfigError, match=match):
    trainers.validate(c)


def test_bad_configs_fail_before_compiling(tmp_path):
  base = lambda: _shrink(grpo_t2i_config.get_config("tiny"), str(tmp_path))
  c = base()
  c.rl.group_size = 1
  _expect_config_error(c, "group_size")
  c = base()
  c.rl.category_weights.portrait.portrait = 0.5
  _expect_config_error(c, "sum to")
  c = base()
  c.rl.timesteps.update(dict(num_train=5, first_m=None))
  _expect_config_error(c, "num_train")
  c = base()
  c.rl.cfg_mode = "sometimes"
  _expect_config_error(c, "cfg_mode")
  c = base()
  c.rl.timesteps.strategy = "late"
  _expect_config_error(c, "strategy")
  c = base()
  c.data.num_prompts = 0
  _expect_config_error(c, "prompt set is empty")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  c = base()
  c.data.prompt_file = str(empty)
  _expect_config_error(c, "no prompts")
  c = base()
  c.rewards.names = ("alignment", "nonsense")
  _expect_config_error(c, "unknown rewards")
  # init_from is checked when the run starts, before anything compiles.
  from qwen_image_rl import config_lib, main

  c = base()
  c.init_from = str(tmp_path / "nowhere")
  with pytest.raises(config_lib.ConfigError, match="init_from"):
    main.run(c, str(tmp_path / "run"))


def test_full_size_configs_validate_and_build_abstract_shapes():
  import jax.numpy as jnp

  from qwen_image_rl import trainers
  from qwen_image_rl.models.mmdit import QwenImageTransformer, count_params

  for c in (
    grpo_t2i_config.get_config("qwen_image"),
    grpo_edit_config.get_config("qwen_image_edit"),
  ):
    assert trainers.validate(c).name == "grpo"
  c = grpo_t2i_config.get_config("qwen_image")
  model = QwenImageTransformer.from_config(
    dict(c.model.transformer),
    **dict(c.model.transformer_overrides),
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
  )
  n = count_params(model.abstract_params())
  assert 19e9 < n < 21e9, n


def _curated(variant, pipe_dir, num_prompts, workdir):
  """(config, summary, prompt file) of a toy curation run that keeps every non-flat group."""
  from qwen_image_rl import main

  c = _shrink(curate_config.get_config(variant), pipe_dir)
  c.data.num_prompts = num_prompts
  c.rl.update(dict(group_size=3, prompts_per_step=4, num_steps=2))
  c.rl.curation.threshold = 0.0
  summary = main.run(c, workdir)
  return c, summary, os.path.join(workdir, "curated_prompts.jsonl")


@pytest.mark.torch
def test_curate_writes_prompt_file(pipe_dir, tmp_path):
  from qwen_image_rl import main
  from qwen_image_rl.data import prompt_files
  from qwen_image_rl.trainers.curate import CurationError

  workdir = str(tmp_path / "curate")
  c, summary, _ = _curated("tiny", pipe_dir, 8, workdir)
  records = prompt_files.read_prompt_file(os.path.join(workdir, "curated_prompts.jsonl"))
  assert len(records) == summary["n_kept"] >= 1
  assert all(r.extra["range"] > 0.0 and "spec" in r.extra for r in records)
  with open(os.path.join(workdir, "results", "curation.json")) as f:
    saved = json.load(f)
  assert sum(saved["histogram"]["counts"]) == 8 and saved["n_prompts"] == 8
  # The curated file feeds a grpo run's prompt pool (validation reads it).
  from qwen_image_rl import trainers

  g = _small_grpo(pipe_dir)
  g.data.prompt_file = os.path.join(workdir, "curated_prompts.jsonl")
  trainers.validate(g)
  c.rl.curation.threshold = 10.0
  with pytest.raises(CurationError, match="no prompt kept"):
    main.run(c, str(tmp_path / "curate_none"))


@pytest.mark.torch
def test_curate_edits_writes_an_edit_prompt_file_an_edit_run_reads(pipe_dir, tmp_path):
  from qwen_image_rl import trainers
  from qwen_image_rl.data import examples, prompt_files
  from qwen_image_rl.rl.prompts import edit_prompts

  c, summary, path = _curated("edit", pipe_dir, 6, str(tmp_path / "curate_edit"))
  pairs = prompt_files.read_edit_prompt_file(path)
  assert len(pairs) == summary["n_kept"] >= 1
  pool = examples.edit_examples(c.seed, 6, "train", 32)
  kept = [pool.edits.index(e) for _, e in pairs]  # each record is one of the pool's edits
  assert kept == sorted(set(kept))
  assert [r.prompt for r, _ in pairs] == [pool.instructions[i] for i in kept]
  assert all(r.extra["range"] > 0.0 for r, _ in pairs)
  # An edit RL run takes the file as its prompt set: validation reads it, the pool renders the
  # kept edits' sources.
  g = _small_grpo(pipe_dir, "edit")
  g.data.prompt_file = path
  trainers.validate(g)
  _, _, triples, sources = edit_prompts(g)
  np.testing.assert_array_equal(sources, pool.sources[kept])


@pytest.mark.slow
@pytest.mark.torch
def test_grpo_exact_resume_after_sigkill(pipe_dir, tmp_path):
  steps = 4
  code = (
    "from tests.test_grpo_trainer import _small_grpo\n"
    f"c = _small_grpo({pipe_dir!r}); c.total_steps = {steps}; c.eval.num_t2i = 0"
  )
  kill_and_resume.assert_killed_then_resumed_run_is_exact(
    code, str(tmp_path / "straight"), str(tmp_path / "resumed"), steps, kill_after_step=1
  )


def test_ablation_variants_and_table(tmp_path):
  from qwen_image_rl import grpo_ablation, trainers

  for name in grpo_ablation.VARIANTS:  # each variant passes the trainer's own checks
    trainers.validate(grpo_ablation.variant_config(name, "base_dir", iterations=3, num_t2i=8))
  c = grpo_ablation.variant_config("all", "base_dir", iterations=3, num_t2i=8)
  assert c.rl.timesteps.strategy == "all" and c.rl.timesteps.num_train == c.rl.num_steps
  assert (c.total_steps, c.init_from, c.eval.num_t2i, c.eval.num_edits) == (3, "base_dir", 8, 0)
  assert grpo_ablation.variant_config("cfg_none", "b", 3, 8).rl.cfg_mode == "none"
  assert grpo_ablation.variant_config("high_noise", "b", 3, 8).rl.timesteps.strategy == "high_noise"
  assert not grpo_ablation.variant_config("cfg_none", "b", 3, 8, eval_base=False).eval.at_start
  # Only the first variant evaluates the base; the table uses its score for every row.
  for name, after, reward in (("high_noise", 0.41, 0.62), ("cfg_none", 0.28, 0.70)):
    run = tmp_path / name
    (run / "results").mkdir(parents=True)
    config = grpo_ablation.variant_config(name, "b", 3, 8)
    (run / "config.json").write_text(config.to_json())
    if name == "high_noise":
      (run / "results" / "eval_0.json").write_text(json.dumps({"t2i": {"overall": 0.30}}))
    (run / "results" / "eval_3.json").write_text(
      json.dumps({"t2i": {"overall": after}, "rewards": {"composite/mean": reward}})
    )
  (tmp_path / "all").mkdir()
  (tmp_path / "all" / "config.json").write_text(
    grpo_ablation.variant_config("all", "b", 3, 8).to_json()
  )
  lines = grpo_ablation.table(str(tmp_path), ["high_noise", "cfg_none", "all"]).splitlines()
  assert lines[2] == "| high_noise | high_noise | rollout_only | 0.620 | 0.300 -> 0.410 | +0.110 |"
  assert lines[3] == "| cfg_none | high_noise | none | 0.700 | 0.300 -> 0.280 | -0.020 |"
  assert lines[4] == "| all | (incomplete) | | | | |"


def test_shared_initial_noise_is_per_prompt_group():
  import types

  import jax

  from qwen_image_rl.rl.collect import Roller

  def noise(shared):
    roller = types.SimpleNamespace(
      config=types.SimpleNamespace(rl=types.SimpleNamespace(shared_initial_noise=shared)),
      chunk=8,
      group=4,
      seq_len=3,
      channels=2,
    )
    return np.asarray(Roller.initial_noise(roller, jax.random.key(0)))

  shared, independent = noise(True), noise(False)
  assert shared.shape == independent.shape == (8, 3, 2)
  for group in (shared[:4], shared[4:]):
    np.testing.assert_array_equal(group, np.broadcast_to(group[:1], group.shape))
  assert not np.allclose(shared[0], shared[4])  # groups differ from each other
  assert not np.allclose(independent[0], independent[1])  # no sharing when off
