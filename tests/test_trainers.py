"""End-to-end trainers at toy sizes: vae -> sft (+ eval), exact resume of sft after SIGKILL."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import sft as sft_config  # noqa: E402
from configs import vae as vae_config  # noqa: E402
from tests import kill_and_resume  # noqa: E402


def _small_vae():
  c = vae_config.get_config("tiny")
  c.total_steps = 3
  c.model.vae.base_dim = 8
  c.data.update(dict(image_size=32, batch_size=4, num_train=16, num_eval=8))
  c.checkpoint.every = 2
  c.log.every = 1
  return c


def _small_sft(vae_dir):
  c = sft_config.get_config("tiny")
  c.total_steps = 6
  c.model.vae_from = vae_dir
  c.model.transformer.update(
    dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6))
  )
  c.model.text_encoder.update(
    dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, mrope_section=(1, 1, 2))
  )
  c.data.update(
    dict(
      image_size=32,
      num_train=16,
      num_train_edits=8,
      t2i_batch_size=4,
      edit_batch_size=2,
      micro_batches=2,
      max_text_tokens=48,
    )
  )
  c.eval.update(
    dict(num_t2i=4, num_edits=2, image_size=32, num_steps=2, batch_size=4, max_text_tokens=48)
  )
  c.checkpoint.every = 2
  c.log.every = 1
  return c


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
  from qwen_image_rl import main

  workdir = str(tmp_path_factory.mktemp("vae"))
  results = main.run(_small_vae(), workdir)
  return workdir, results


def test_vae_trainer_exports_a_loadable_vae(vae_run):
  from qwen_image_rl.convert.vae import load_vae

  workdir, results = vae_run
  assert os.path.isfile(os.path.join(workdir, "config.json"))
  with open(os.path.join(workdir, "results", "eval_3.json")) as f:
    saved = json.load(f)
  assert saved["psnr"] == pytest.approx(results["psnr"])
  assert 0.0 <= saved["oracle_on_reconstructions"]["overall"] <= 1.0
  vae, _ = load_vae(os.path.join(workdir, "export", "vae"))
  # The latent statistics measured on held-out images are written into the exported config.
  assert len(vae.latents_std) == vae.z_dim and all(s > 0 for s in vae.latents_std)
  assert vae.latents_std != (1.0,) * vae.z_dim


def test_sft_trains_evaluates_and_exports(vae_run, tmp_path):
  from qwen_image_rl import main
  from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline

  workdir = str(tmp_path / "base")
  config = _small_sft(os.path.join(vae_run[0], "export", "vae"))
  config.optim.ema_decay = 0.5
  results = main.run(config, workdir)
  with open(os.path.join(workdir, "results", "eval_6.json")) as f:
    saved = json.load(f)
  assert saved["step"] == 6 and saved["n_samples"] == 6
  for c, v in saved["t2i"]["by_category"].items():
    assert 0.0 <= v <= 1.0, c
  assert set(saved["t2i"]["by_category"]) == {"general", "typography", "portrait", "landscape"}
  assert 0.0 <= saved["edit"]["instruction_following"] <= 1.0
  assert saved["t2i"]["overall"] == pytest.approx(results["t2i"]["overall"])
  pipe = QwenImagePipeline.from_pretrained(os.path.join(workdir, "export", "pipeline"))
  images = pipe(prompt=["a red circle"], num_inference_steps=2, height=32, width=32, seed=0)
  assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
  # The export is the weight average kept in the optimiser state, not the last weights.
  import jax
  import orbax.checkpoint as ocp

  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "6", "state"))
  # Scanned blocks are stored stacked and exported per layer: compare the multisets of values.
  values = lambda tree: np.sort(np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]))
  exported = values(pipe.transformer_params)
  np.testing.assert_array_equal(exported, values(state["opt_state"]["ema"]))
  assert not np.array_equal(exported, values(state["params"]))


@pytest.mark.slow
def test_sft_exact_resume_after_sigkill(vae_run, tmp_path):
  vae_dir = os.path.join(vae_run[0], "export", "vae")
  steps = 8
  code = (
    "from tests.test_trainers import _small_sft\n"
    f"c = _small_sft({vae_dir!r}); c.total_steps = {steps}; c.eval.num_t2i = 0\n"
    "c.checkpoint.async_save = False"
  )
  kill_and_resume.assert_killed_then_resumed_run_is_exact(
    code, str(tmp_path / "straight"), str(tmp_path / "resumed"), steps, kill_after_step=2
  )


def test_sft_rejects_a_text_budget_that_truncates_prompts(tmp_path):
  from qwen_image_rl.config_lib import ConfigError
  from qwen_image_rl.trainers import sft

  tokenizer = sft.build_tokenizer(str(tmp_path / "tok"))
  with pytest.raises(
    ConfigError,
    match=r"max_text_tokens=3 would truncate prompts: the longest "
    r"has 12 tokens",
  ):
    sft.encode_texts(
      None, None, tokenizer, ["a red circle", "a large blue square at the top"], sft.T2I_TEMPLATE, 3
    )


def test_training_times_cover_the_first_sampling_steps():
  """The logit-normal alone leaves t > 0.95 (where sampling starts) almost untrained."""
  import jax

  from qwen_image_rl.trainers import sft

  key = jax.random.key(0)
  high = lambda t: float(np.mean(np.asarray(t) > 0.95))
  logit_normal = sft.sample_training_times(key, 200_000)
  mixed = sft.sample_training_times(key, 200_000, uniform_fraction=0.5)
  uniform = sft.sample_training_times(key, 200_000, uniform_fraction=1.0)
  shifted = sft.sample_training_times(key, 200_000, uniform_fraction=1.0, shift=3.0)
  assert high(logit_normal) < 0.005
  assert high(mixed) == pytest.approx(0.025 + 0.5 * high(logit_normal), abs=0.003)
  assert high(uniform) == pytest.approx(0.05, abs=0.003)
  # s t / (1 + (s - 1) t) > 0.95  <=>  t > 0.95 / (s - 0.95 (s - 1)) = 0.8636 for s = 3.
  assert high(shifted) == pytest.approx(1 - 0.95 / (3 - 0.95 * 2), abs=0.004)
  for t in (logit_normal, shifted):
    assert float(np.min(t)) > 0.0 and float(np.max(t)) < 1.0


def _tiny_mmdit(num_layers: int):
  """A small MMDiT (16 latent channels in, 8-dim text) and its initial parameters."""
  import flax.linen as nn
  import jax

  from qwen_image_rl.models.mmdit import QwenImageTransformer

  model = QwenImageTransformer(
    num_layers=num_layers,
    num_attention_heads=2,
    attention_head_dim=16,
    axes_dims_rope=(4, 6, 6),
    in_channels=16,
    out_channels=4,
    joint_attention_dim=8,
  )
  return model, nn.meta.unbox(model.init_params(jax.random.key(0)))


def test_sft_micro_batches_give_the_one_batch_update():
  """The step draws dropout, times and noise for the whole batch, so splitting it into
  micro-batches changes only rounding."""
  import jax
  import jax.numpy as jnp
  import optax

  from qwen_image_rl.train_state import TrainState
  from qwen_image_rl.trainers import sft

  model, params = _tiny_mmdit(num_layers=1)
  tx = optax.sgd(1.0)  # the update is the gradient itself
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  batch = {}
  for task, b in (("t2i", 4), ("edit", 2)):
    batch.update(
      {
        f"{task}_x0": normal(b, 4, 16),
        f"{task}_cond": normal(b, 6, 8),
        f"{task}_mask": jnp.ones((b, 6), jnp.int32),
        f"{task}_null_cond": normal(6, 8),
        f"{task}_null_mask": jnp.ones((6,), jnp.int32),
      }
    )
  batch["edit_ref_latents"] = normal(2, 4, 16)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(1)),
  )
  results = {}
  for n in (1, 2):
    step = jax.jit(sft.make_train_step(model, tx, (), 0.5, 0.5, 1.0, 1.5, micro_batches=n))
    results[n] = step(state, batch)
  (one, m1), (two, m2) = results[1], results[2]
  for name in ("loss", "t2i_loss", "edit_loss"):
    np.testing.assert_allclose(float(m2[name]), float(m1[name]), rtol=1e-5)
  grads = lambda new: jax.tree.leaves(jax.tree.map(jnp.subtract, params, new.params))
  largest = max(float(jnp.max(jnp.abs(g))) for g in grads(one))
  assert largest > 1e-3  # the step moved the parameters
  for a, b in zip(grads(one), grads(two)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * largest)


def _masks(lengths, width):
  """Text masks [len(lengths), width]: each prompt's tokens first, then padding."""
  return np.array([[1] * n + [0] * (width - n) for n in lengths], np.int32)


def test_trim_padding_cuts_the_text_stream_to_the_longest_prompt():
  from qwen_image_rl.pipelines.prompt_encoding import trim_padding

  for lengths, width, multiple, expected in (
    ((3, 5), 48, 8, 8),  # rounded up to the multiple
    ((9, 2), 48, 8, 16),
    ((15,), 16, 8, 16),
    ((11,), 12, 8, 12),  # never past the encoded length
    ((0, 0), 48, 8, 8),  # empty prompts keep one multiple
    ((5,), 48, 4, 8),
  ):
    mask = _masks(lengths, width)
    cond = np.random.default_rng(0).normal(size=(len(lengths), width, 3)) * mask[..., None]
    cut_cond, cut_mask = trim_padding(cond, mask, multiple)
    assert cut_cond.shape == (len(lengths), expected, 3) and cut_mask.shape[1] == expected
    np.testing.assert_array_equal(cut_mask.sum(axis=1), mask.sum(axis=1))  # no token lost
    np.testing.assert_array_equal(cut_cond, cond[:, :expected])


def test_sft_loss_and_gradient_do_not_depend_on_text_padding():
  """The sft trainer trims each task's text stream to its longest prompt: exact, because
  padding is masked out of attention and text RoPE positions ignore the padded length."""
  import jax
  import jax.numpy as jnp

  from qwen_image_rl.pipelines.prompt_encoding import trim_padding
  from qwen_image_rl.trainers import sft

  model, params = _tiny_mmdit(num_layers=2)
  rng = np.random.default_rng(0)
  mask = _masks((3, 7, 5), 24)
  cond = rng.normal(size=(3, 24, 8)).astype(np.float32) * mask[..., None]
  x0, eps, ref = (jnp.asarray(rng.normal(size=(3, 4, 16)), jnp.float32) for _ in range(3))
  t = jnp.asarray([0.2, 0.6, 0.9], jnp.float32)

  def loss_and_grad(cond, mask):
    fn = lambda p: sft.velocity_loss(model, p, x0, cond, mask, t, eps, ref_latents=ref)
    return jax.value_and_grad(fn)(params)

  cut = trim_padding(cond, mask)
  assert cut[0].shape[1] == 8
  (full_loss, full_grad), (cut_loss, cut_grad) = loss_and_grad(cond, mask), loss_and_grad(*cut)
  np.testing.assert_allclose(float(cut_loss), float(full_loss), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full_grad), jax.tree.leaves(cut_grad)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_sft_rejects_micro_batches_that_do_not_split_the_batches(tmp_path):
  from qwen_image_rl import main
  from qwen_image_rl.config_lib import ConfigError

  for value, match in ((3, "must divide config.data.t2i_batch_size=4"), (0, "expected an")):
    c = _small_sft(str(tmp_path))
    c.data.micro_batches = value
    with pytest.raises(ConfigError, match=f"config.data.micro_batches={value}.*{match}"):
      main.run(c, str(tmp_path / "run"))


def test_sft_rejects_bad_time_sampling(tmp_path):
  from qwen_image_rl import main
  from qwen_image_rl.config_lib import ConfigError

  for field, value, match in (
    ("uniform_time_fraction", 1.5, "must be in \\[0, 1\\]"),
    ("uniform_time_fraction", -0.1, "must be in \\[0, 1\\]"),
    ("time_shift_scale", 0.0, "must be > 0"),
  ):
    c = _small_sft(str(tmp_path))
    c.loss[field] = value
    with pytest.raises(ConfigError, match=f"config.loss.{field}=.*{match}"):
      main.run(c, str(tmp_path / "run"))
  c = _small_sft(str(tmp_path))
  c.data.t2i_categories = ("general", "poster")
  with pytest.raises(ConfigError, match="t2i_categories: unknown category 'poster'"):
    main.run(c, str(tmp_path / "run"))


def test_sft_time_shift_scale_multiplies_the_samplers_shift():
  from qwen_image_rl.trainers import sft

  c = sft_config.get_config("tiny")
  plain = sft.time_shift(c, 64)
  assert plain == pytest.approx(1.633, abs=1e-3)  # e^mu of the schedule at 64 tokens
  c.loss.time_shift_scale = 2.0
  assert sft.time_shift(c, 64) == pytest.approx(2 * plain)
  c.loss.shift_like_sampler = False
  assert sft.time_shift(c, 64) == 1.0
  assert sft.t2i_categories(c.data) == ("general", "typography", "portrait", "landscape")


def test_demo_runs_a_stage_and_skips_it_once_done(tmp_path, capsys):
  """The demo driver and the entry point live in one process (their flags must not clash)."""
  from qwen_image_rl import config_lib, demo, main  # noqa: F401  (both define absl flags)

  config = _small_vae()
  config.total_steps = 1
  demo.run_stage("vae", config, str(tmp_path))
  assert os.path.isdir(tmp_path / "vae" / "export" / "vae")
  assert demo.run_stage("vae", config, str(tmp_path)) is False
  out = capsys.readouterr().out
  assert "finished earlier" in out and "warning" not in out
  # A finished stage that ran with other settings (a WORKDIR from an older demo) is kept, and
  # the skip names what differs.
  config.optim.lr *= 2
  assert demo.run_stage("vae", config, str(tmp_path)) is False
  assert "other settings than the demo's now (optim.lr)" in capsys.readouterr().out
  # An unfinished stage with other settings (here a longer budget) is not resumed under them.
  config.total_steps = 2
  with pytest.raises(config_lib.ConfigError, match=r"unfinished run .*\(optim.lr, total_steps\)"):
    demo.run_stage("vae", config, str(tmp_path))
  assert not demo.stage_done(str(tmp_path), "vae", config)
  # Bookkeeping alone (how often to log, save or what to evaluate) does not block a resume, and
  # a finished stage whose bookkeeping differs is kept without a warning.
  config.optim.lr /= 2
  config.log.every += 1
  assert demo.changed_settings(str(tmp_path / "vae"), config) == ["log.every", "total_steps"]
  config.total_steps = 1
  assert demo.run_stage("vae", config, str(tmp_path)) is False  # finished: kept, no warning
  assert "warning" not in capsys.readouterr().out
  shutil.rmtree(tmp_path / "vae" / "export")  # unfinished again, with only log.every changed
  assert demo.run_stage("vae", config, str(tmp_path)) is True
  assert demo.stage_done(str(tmp_path), "vae", config)
  # A key added to the configs later reads, in an older record, as the value it had then.
  record = tmp_path / "base"
  record.mkdir()
  sft_now = sft_config.get_config("tiny")
  older = json.loads(config_lib.to_json(sft_now))
  del older["loss"]["time_shift_scale"], older["data"]["t2i_categories"]
  del older["model"]["transformer_overrides"]["init_scheme"]
  (record / "config.json").write_text(json.dumps(older))
  assert demo.changed_settings(str(record), sft_now) == []
  sft_now.loss.time_shift_scale = 2.0
  assert demo.changed_settings(str(record), sft_now) == ["loss.time_shift_scale"]
  # A path given relative one time and absolute the next (--workdir=runs/x, then /abs/runs/x)
  # is the same setting; another directory is not.
  sft_now.loss.time_shift_scale = 1.0
  sft_now.model.vae_from = os.path.abspath(older["model"]["vae_from"] or "runs/demo/vae")
  older["model"]["vae_from"] = os.path.relpath(sft_now.model.vae_from)
  (record / "config.json").write_text(json.dumps(older))
  assert demo.changed_settings(str(record), sft_now) == []
  sft_now.model.vae_from += "_other"
  assert demo.changed_settings(str(record), sft_now) == ["model.vae_from"]
  sft_now.model.vae_from = os.path.abspath(older["model"]["vae_from"])
  sft_now.loss.time_shift_scale = 2.0
  # The base's eval settings (its CFG scale moved 4 -> 2.5) are bookkeeping: they change what the
  # stage would report, not what it trained. The summary scores the base at that scale too.
  sft_now.eval.cfg_scale = 4.0
  assert "eval.cfg_scale" in demo.changed_settings(str(record), sft_now)
  assert "eval.cfg_scale".startswith(demo.BOOKKEEPING)
  base_cfg = sft_config.get_config("tiny").eval.cfg_scale
  assert ("base_cfg2.5", "base", base_cfg) in demo.SUMMARY_ROWS
  # No pipeline exported yet: the summary has no rows, but writes its JSON.
  assert demo.summary(str(tmp_path)).count("\n") == 1
  assert os.path.isfile(tmp_path / "summary.json")
  stages = dict(demo.stages(str(tmp_path)))
  assert list(stages) == ["vae", "base", "rl_t2i", "curate_edit", "rl_edit", "opd"]
  export = lambda s: str(tmp_path / s / "export" / "pipeline")
  # The edit teacher trains on the edits the base's own rollouts rank (curated under the
  # rollouts' sampler); curate_edit is done once its prompt file is there.
  curate = stages["curate_edit"]
  assert (curate.trainer, curate.rl.task, curate.init_from) == ("curate", "edit", export("base"))
  assert curate.rl.num_steps == stages["rl_edit"].rl.num_steps
  curated = tmp_path / "curate_edit" / "curated_prompts.jsonl"
  assert stages["rl_edit"].data.prompt_file == str(curated)
  assert not demo.stage_done(str(tmp_path), "curate_edit", curate)
  curated.parent.mkdir()
  curated.write_text("{}\n")
  assert demo.stage_done(str(tmp_path), "curate_edit", curate)
  for rl in ("rl_t2i", "rl_edit"):
    assert stages[rl].init_from == export("base")
    assert stages[rl].total_steps == demo.DEMO_ITERATIONS[rl]
    # Both teachers train DiffusionNFT: GRPO's T2I policy lost the general scenes in held-out
    # evaluation where nft kept them (README, "100-iteration curves").
    assert stages[rl].rl.objective == "nft"
    # 12 flow-matching draws: the first setting that moved both teachers above the placebo.
    assert stages[rl].rl.fm_draws == demo.DEMO_FM_DRAWS == 12
  assert stages["opd"].init_from == export("base")
  assert (stages["opd"].teachers.t2i, stages["opd"].teachers.edit) == (
    export("rl_t2i"),
    export("rl_edit"),
  )
  assert stages["opd"].total_steps == demo.DEMO_ITERATIONS["opd"]
  assert stages["opd"].opd.t2i_fraction == demo.DEMO_OPD_T2I_FRACTION
  assert 0 < stages["opd"].opd.num_train_steps == demo.DEMO_OPD_TRAIN_STEPS < 10
  # Only the summary evaluates (its base rows repeat the base's own eval).
  for name in ("base", "rl_t2i", "rl_edit", "opd"):
    assert (stages[name].eval.num_t2i, stages[name].eval.num_edits) == (0, 0), name
  assert stages["base"].model.vae_from == str(tmp_path / "vae" / "export" / "vae")
  # --rl_mix adds the Mix-RL stage before opd, at the two teachers' budget together.
  with_mix = dict(demo.stages(str(tmp_path), rl_mix=True))
  assert list(with_mix) == ["vae", "base", "rl_t2i", "curate_edit", "rl_edit", "rl_mix", "opd"]
  mix = with_mix["rl_mix"]
  assert mix.tasks.edit.data.prompt_file == str(curated)
  assert mix.init_from == export("base")
  assert mix.total_steps == demo.DEMO_ITERATIONS["rl_t2i"] + demo.DEMO_ITERATIONS["rl_edit"]
  assert round(mix.total_steps * mix.mix.t2i_fraction) == demo.DEMO_ITERATIONS["rl_t2i"]


def test_demo_summary_table_and_eta():
  from qwen_image_rl import demo

  rows = {
    "base_cfg4": {
      "t2i": {"overall": 0.3, "overall_mean": 0.5, "strict": 0.1, "by_category": {"general": 0.4}},
      "edit": {"instruction_following": 0.41, "preservation": 0.9, "identity": 0.06},
      "images_per_second": 12.34,
    },
    "student_cfg1": {"t2i": {"overall": 0.31}},
  }
  table = demo.format_summary(rows).splitlines()
  assert len(table) == 4 and table[0].startswith("| run | T2I capped | T2I soft")
  assert "| base_cfg4 | 0.300 | 0.500 | 0.100 | 0.400 | - |" in table[2]
  assert table[2].endswith("| 0.410 | 0.900 | 0.060 | 12.3 |")
  assert table[3].startswith("| student_cfg1 | 0.310 | - |")
  # Paired differences: only comparisons whose two rows carry per-item scores.
  rng = np.random.default_rng(0)
  base_t2i, base_edit = rng.uniform(size=8), rng.uniform(size=6)
  cats = ["general", "portrait"] * 4
  rows["base_cfg4"]["t2i"].update(per_prompt=list(base_t2i), per_prompt_category=cats)
  rows["base_cfg4"]["edit"]["per_edit_instruction_following"] = list(base_edit)
  rows["student_cfg1"]["t2i"].update(per_prompt=list(base_t2i + 0.05), per_prompt_category=cats)
  rows["student_cfg1"]["edit"] = {"per_edit_instruction_following": list(base_edit - 0.02)}
  found = {(c["a"], c["b"], c["task"]): c for c in demo.comparisons(rows)}
  assert set(found) == {("student_cfg1", "base_cfg4", "t2i"), ("student_cfg1", "base_cfg4", "edit")}
  assert found["student_cfg1", "base_cfg4", "t2i"]["difference"] == pytest.approx(0.05)
  assert found["student_cfg1", "base_cfg4", "edit"]["difference"] == pytest.approx(-0.02)
  assert found["student_cfg1", "base_cfg4", "edit"]["standard_error"] == pytest.approx(0, abs=1e-12)
  lines = demo.format_comparisons(list(found.values())).splitlines()
  assert "| student_cfg1 - base_cfg4 | edit IF | -0.020 | 0.000 |" in lines
  progress = demo.Progress(["vae", "base", "summary"])
  remaining = demo.ESTIMATED_SECONDS["base"] + demo.ESTIMATED_SECONDS["summary"]
  assert progress.eta_seconds(["base", "summary"]) == remaining
  progress.measured["vae"] = 2 * demo.ESTIMATED_SECONDS["vae"]  # this machine is 2x slower
  assert progress.eta_seconds(["base", "summary"]) == 2 * remaining


def test_demo_summary_eval_size_flags():
  from configs import common
  from qwen_image_rl import demo

  default = common.tiny_eval()
  assert demo.summary_eval_config().to_dict() == default.to_dict()
  bigger = demo.summary_eval_config(512, 256)
  assert (bigger.num_t2i, bigger.num_edits, bigger.split) == (512, 256, default.split)
  with pytest.raises(ValueError, match="--summary_edits=0: must be >= 1"):
    demo.summary_eval_config(None, 0)


def test_demo_images_per_second_is_the_median_of_timed_batches(monkeypatch):
  from configs import common
  from qwen_image_rl import demo, evaluation

  sampled = []
  monkeypatch.setattr(evaluation, "sample_t2i", lambda pipe, prompts, *a: sampled.append(prompts))
  # perf_counter pairs around three timed batches: 1 s, 4 s, 2 s.
  clock = iter([0.0, 1.0, 10.0, 14.0, 20.0, 22.0])
  monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
  cfg = common.tiny_eval()
  rate = demo.images_per_second(None, cfg, seed=0, repeats=3)
  assert rate == cfg.batch_size / 2.0  # the median batch, not the first or the mean
  assert len(sampled) == 4 and len(sampled[0]) == cfg.batch_size  # a warm-up call, then 3


def test_demo_summary_rows_are_cached_per_export_and_eval_settings(tmp_path, monkeypatch):
  from configs import common
  from qwen_image_rl import demo, evaluation
  from qwen_image_rl.rl import policy

  export = tmp_path / "base" / "export" / "pipeline"
  export.mkdir(parents=True)
  (export / "model_index.json").write_text("{}")
  calls = []

  def fake_evaluate(t2i, edit, cfg, *, step, seed):
    calls.append(cfg.num_t2i)
    return {"t2i": {"overall": 0.3, "per_prompt": [0.3] * cfg.num_t2i}}

  monkeypatch.setattr(policy, "load_exported", lambda *a: (None, None))
  monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
  monkeypatch.setattr(demo, "images_per_second", lambda *a: 1.0)
  cfg = common.tiny_eval()
  row = lambda c: demo.evaluate_row(str(tmp_path), "base_cfg4", "base", 4.0, c, seed=0)
  assert row(cfg)["t2i"]["overall"] == 0.3 and calls == [cfg.num_t2i]
  assert row(cfg)["images_per_second"] == 1.0 and len(calls) == 1  # from the cache
  bigger = cfg.copy_and_resolve_references()
  bigger.num_t2i = 2 * cfg.num_t2i
  row(bigger)  # other eval settings: evaluated again
  assert calls == [cfg.num_t2i, 2 * cfg.num_t2i]
  cache = tmp_path / "summary" / "base_cfg4.json"
  os.utime(cache, (1, 1))  # older than the export: evaluated again
  row(bigger)
  assert len(calls) == 3
  # A row timed another way (an older WORKDIR's single timed batch): evaluated again.
  monkeypatch.setattr(demo, "TIMED_BATCHES", demo.TIMED_BATCHES + 1)
  row(bigger)
  assert len(calls) == 4
  assert demo.evaluate_row(str(tmp_path), "x", "rl_t2i", 4.0, cfg, seed=0) is None  # no export
