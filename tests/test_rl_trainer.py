"""Forward-process objectives through the trainer: the curves command end to end (nft, awm and
grpo at toy size on a tiny random pipeline: CSV, PNG, moved weights), config errors, and exact
resume of nft (its EMA old policy included) and raft runs after SIGKILL."""

import csv
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests import kill_and_resume  # noqa: E402

SMALL = (
  ("data.image_size", 32),
  ("data.num_prompts", 16),
  ("data.max_text_tokens", 48),
  ("rl.group_size", 4),
  ("rl.prompts_per_step", 2),
  ("rl.rollout_chunks", 2),
  ("rl.num_steps", 4),
  ("rl.timesteps.num_train", 2),
  ("rl.timesteps.first_m", 3),
  ("rl.fm_draws", 2),
  ("eval.num_t2i", 4),
  ("eval.num_edits", 2),
  ("eval.image_size", 32),
  ("eval.num_steps", 2),
  ("eval.batch_size", 4),
  ("checkpoint.async_save", False),
  ("log.images_every", 0),
)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
  from tests import tiny_reference

  _, path = tiny_reference.build_t2i(str(tmp_path_factory.mktemp("tiny_pipe")))
  return path


def small_rl(pipe_dir, objective="nft", task="t2i"):
  from configs import rl_edit, rl_t2i

  c = (rl_t2i if task == "t2i" else rl_edit).get_config("tiny")
  c.rl.objective = objective
  c.update_from_flattened_dict(dict(SMALL))
  c.init_from = pipe_dir
  c.total_steps = 3
  c.eval.update(dict(every=0, at_start=False))
  c.checkpoint.every = 1
  return c


@pytest.mark.torch
def test_curves_train_every_objective_at_an_equal_budget(pipe_dir, tmp_path):
  from qwen_image_rl import rl_curves
  from qwen_image_rl.convert.safetensors_io import load_state_dict

  workdir = str(tmp_path / "curves")
  rows = rl_curves.run_curves(
    workdir, "t2i", ["nft", "awm", "grpo"], pipe_dir, rollouts=16, eval_every=8, overrides=SMALL
  )
  with open(os.path.join(workdir, "curves.csv")) as f:
    table = list(csv.DictReader(f))
  # Base + evaluations after iterations 1 and 2 (8 rollouts each) for every objective.
  for name in ("nft", "awm", "grpo"):
    mine = [r for r in table if r["objective"] == name]
    assert [int(r["rollouts"]) for r in mine] == [0, 8, 16], name
    assert all(0.0 <= float(r["heldout_capped"]) <= 1.0 for r in mine)
    assert np.isfinite(float(mine[-1]["train_reward"]))
    assert rows[name][-1]["iteration"] == 2
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
  base = load_state_dict(os.path.join(pipe_dir, "transformer"))
  for name in ("nft", "awm"):
    trained = load_state_dict(os.path.join(workdir, name, "export", "pipeline", "transformer"))
    moved = max(float(np.max(np.abs(trained[k] - base[k]))) for k in base)
    assert moved > 1e-6, name


def test_forward_objective_config_errors(pipe_dir):
  from qwen_image_rl import config_lib, trainers

  cases = (
    (dict(shared_initial_noise=True), "shared_initial_noise"),
    (dict(fm_draws=0), "fm_draws"),
    (dict(fm_time="beta"), "fm_time"),
    (dict(advantage_std="prompt"), "advantage_std"),
  )
  for overrides, match in cases:
    c = small_rl(pipe_dir)
    c.rl.update(overrides)
    with pytest.raises(config_lib.ConfigError, match=match):
      trainers.validate(c)
  c = small_rl(pipe_dir)
  c.rl.nft.old_policy = "polyak"
  with pytest.raises(config_lib.ConfigError, match="old policy"):
    trainers.validate(c)
  c = small_rl(pipe_dir, "grpo")
  c.rl.update(dict(shared_initial_noise=True, sde_type="cps"))
  c.rl.timesteps.first_m = c.rl.num_steps
  with pytest.raises(config_lib.ConfigError, match="cps"):
    trainers.validate(c)


def test_curve_entries_name_a_reward_variant():
  from qwen_image_rl import config_lib, rl_curves

  entry = "awm@judge_no_cot=runs/j/export/judge"
  c = rl_curves.objective_config(entry, "t2i", "BASE", 128, 64, 0, (), eval_base=False)
  assert c.rl.objective == "awm" and c.init_from == "BASE"
  assert set(c.rewards.names) == {"judge_alignment", "judge_aesthetics", "judge_portrait"}
  assert all(
    kw["judge_dir"] == "runs/j/export/judge" and not kw["cot"] for kw in c.rewards.kwargs.values()
  )
  plain = rl_curves.objective_config("awm", "t2i", "BASE", 128, 64, 0, (), eval_base=False)
  assert "alignment" in plain.rewards.names and not plain.rl.placebo
  for task in ("t2i", "edit"):  # the control run differs from the real one only in rl.placebo
    real = rl_curves.objective_config("nft", task, "BASE", 128, 64, 0, (), eval_base=False)
    control = rl_curves.objective_config("nft@placebo", task, "BASE", 128, 64, 0, (), False)
    assert control.rl.placebo and not real.rl.placebo
    control.rl.placebo = False
    assert control.to_dict() == real.to_dict()
  assert rl_curves.run_name(entry) == "awm@judge_no_cot_runs_j_export_judge"
  assert rl_curves.short_label(entry) == "awm@judge_no_cot=j"
  assert rl_curves.short_label("nft") == "nft"
  assert rl_curves.short_label("nft@judge=/abs/judge_dir") == "nft@judge=judge_dir"
  for bad in ("grpo@judge=x", "nft@bogus"):
    with pytest.raises(config_lib.ConfigError):
      rl_curves.objective_config(bad, "t2i", "BASE", 128, 64, 0, (), eval_base=False)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("objective", ["nft", "raft"])
def test_forward_objective_exact_resume_after_sigkill(pipe_dir, tmp_path, objective):
  # nft carries an EMA old policy in its state; raft's per-batch weights come from the
  # rollouts' advantages alone, so both must come back from the checkpoint bit for bit.
  steps = 4
  code = (
    "from tests.test_rl_trainer import small_rl\n"
    f"c = small_rl({pipe_dir!r}, {objective!r}); c.total_steps = {steps}; c.eval.num_t2i = 0"
  )
  kill_and_resume.assert_killed_then_resumed_run_is_exact(
    code, str(tmp_path / "straight"), str(tmp_path / "resumed"), steps, kill_after_step=1
  )


def test_edit_curves_plot_preservation_and_keep_legends_off_the_curves(tmp_path):
  from qwen_image_rl import rl_curves

  def row(it, value):
    return dict(
      iteration=it,
      rollouts=64 * it,
      train_reward=value,
      heldout_capped=value,
      heldout_soft=value,
      heldout_strict=0.0,
      preservation=0.95,
      identity=0.7,
    )

  rows = {"nft": [row(0, 0.3), row(10, 0.32)], "grpo": [row(0, 0.3), row(10, 0.29)]}
  fig = rl_curves.plot(str(tmp_path / "edit.png"), rows, "edit")
  held, kept, train = fig.axes[:3]
  assert [line.get_label() for line in kept.lines] == [
    "nft preserv.",
    "nft identity",
    "grpo preserv.",
    "grpo identity",
  ]
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  renderer = FigureCanvasAgg(fig).get_renderer()
  for ax in (held, kept, train):  # every legend sits wholly below its axes
    assert ax.get_legend().get_window_extent(renderer).y1 < ax.get_window_extent(renderer).y0
  assert len(rl_curves.plot(str(tmp_path / "t2i.png"), rows, "t2i").axes) == 2
