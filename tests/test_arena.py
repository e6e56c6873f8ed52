"""Bradley-Terry ratings and the image arena (qwen_image_rl.ratings, qwen_image_rl.arena)."""

import json
import os

import numpy as np
import pytest

from qwen_image_rl import arena, ratings


def simulated_battles(theta, n, seed=0, tie_rate=0.0):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, len(theta), n)
  b = (a + rng.integers(1, len(theta), n)) % len(theta)
  p = 1.0 / (1.0 + np.exp(-(np.asarray(theta)[a] - np.asarray(theta)[b])))
  s = (rng.random(n) < p).astype(float)
  s[rng.random(n) < tie_rate] = 0.5
  return np.stack([a, b, s], axis=1)


def test_bradley_terry_recovers_strengths():
  truth = np.array([-0.8, 0.0, 0.3, 1.1])
  fit = ratings.fit_bradley_terry(simulated_battles(truth, 20000), 4)
  np.testing.assert_allclose(fit, truth - truth.mean(), atol=0.06)


def test_bradley_terry_matches_a_brute_force_maximum():
  battles = simulated_battles([0.0, 0.7, -0.4], 300, seed=3, tie_rate=0.2)
  fit = ratings.fit_bradley_terry(battles, 3, prior=1e-2)

  def objective(theta):
    a, b, s = battles[:, 0].astype(int), battles[:, 1].astype(int), battles[:, 2]
    d = theta[a] - theta[b]
    return np.sum(s * -np.logaddexp(0, -d) + (1 - s) * -np.logaddexp(0, d)) - 5e-3 * theta @ theta

  best = objective(fit)
  rng = np.random.default_rng(0)
  for _ in range(200):  # no nearby point is better
    assert objective(fit + rng.normal(0, 0.05, 3)) <= best + 1e-9


def test_all_ties_give_equal_ratings_and_a_sweep_stays_finite():
  ties = [(0, 1, 0.5), (1, 2, 0.5), (0, 2, 0.5)] * 10
  np.testing.assert_allclose(ratings.fit_bradley_terry(ties, 3), 0.0, atol=1e-9)
  sweep = [(0, 1, 1.0), (0, 2, 1.0), (1, 2, 1.0)] * 10  # player 0 never loses
  theta = ratings.fit_bradley_terry(sweep, 3)
  assert np.all(np.isfinite(theta)) and theta[0] > theta[1] > theta[2]


def test_bootstrap_interval_covers_truth_and_narrows_with_more_battles():
  truth = np.array([0.0, 0.5])
  elo_gap = ratings.ELO_SCALE * 0.5
  widths = []
  for n in (200, 3200):
    fit = ratings.bootstrap_elo(simulated_battles(truth, n, seed=n), 2, rounds=100)
    assert fit["low"][1] - fit["high"][0] < elo_gap < fit["high"][1] - fit["low"][0]
    widths.append(fit["high"][1] - fit["low"][1])
  assert widths[1] < 0.5 * widths[0]  # 16x the battles: about a quarter of the width


def test_bad_battles_are_rejected():
  with pytest.raises(ValueError, match="two different players"):
    ratings.fit_bradley_terry([(1, 1, 1.0)], 2)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    ratings.fit_bradley_terry([(0, 1, 2.0)], 2)


def test_pair_outcomes_count_ties_and_every_pair():
  scores = np.array([[0.9, 0.2], [0.5, 0.2], [0.1, 0.7]])
  battles = arena.pair_outcomes(scores, tie=1e-3)
  assert len(battles) == 2 * 3  # 3 pairs on each of 2 prompts
  assert (0, 1, 1.0, 0) in battles and (0, 1, 0.5, 1) in battles and (1, 2, 0.0, 1) in battles


def test_bad_arguments_name_the_problem(tmp_path):
  with pytest.raises(arena.ArenaError, match="NAME=DIR"):
    arena.parse_player("justadir")
  with pytest.raises(arena.ArenaError, match="model_index.json"):
    arena.parse_player(f"base={tmp_path}")
  (tmp_path / "model_index.json").write_text("{}")
  with pytest.raises(arena.ArenaError, match="not a number"):
    arena.parse_player(f"base={tmp_path}@high")
  assert arena.parse_player(f"s={tmp_path}@1") == ("s", str(tmp_path), 1.0)
  with pytest.raises(arena.ArenaError, match="rater='gpt'.*judge directory"):
    arena.parse_args(["--pipelines", "a=x", "b=y", "--rater=gpt"])


def test_invalid_scores_sit_their_battles_out():
  scores = np.array([[0.9, np.nan], [0.5, 0.3], [0.1, 0.7]])
  battles = arena.pair_outcomes(scores, tie=1e-3)
  assert len(battles) == 3 + 1  # prompt 1: only players 1 and 2 were both scored
  assert (1, 2, 0.0, 1) in battles and not any(a == 0 and k == 1 for a, _, _, k in battles)


@pytest.fixture(scope="module")
def tiny_t2i_pipeline_dir(tmp_path_factory):
  from tests import tiny_reference

  _, path = tiny_reference.build_t2i(str(tmp_path_factory.mktemp("arena_pipe")))
  return path


@pytest.mark.torch
def test_arena_end_to_end_writes_rated_tables(tmp_path, tiny_t2i_pipeline_dir):
  """The same weights at CFG 4 and CFG 1: both rated, JSON / markdown / PNG written."""
  out = tmp_path / "arena"
  result = arena.run(
    [
      "--pipelines",
      f"a={tiny_t2i_pipeline_dir}@4",
      f"b={tiny_t2i_pipeline_dir}@1",
      "--battles=8",
      "--tasks=t2i",
      "--num_steps=2",
      "--image_size=32",
      "--bootstrap=20",
      f"--out={out}",
    ]
  )
  table = result["ratings"]
  assert table["t2i"]["battles"] == 8
  players = table["t2i"]["players"]
  for p in players.values():
    assert p["low"] <= p["elo"] <= p["high"]
  # Ratings are centred: the two Elo points sum to twice the centre.
  assert players["a"]["elo"] + players["b"]["elo"] == pytest.approx(2 * ratings.ELO_CENTRE)
  assert json.loads((out / "arena.json").read_text())["prompts_per_task"] == 8
  assert "| t2i | 8 |" in (out / "arena.md").read_text()
  assert os.path.getsize(out / "arena.png") > 1000


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
  """A tiny random pointwise judge saved as reward_sft exports one (WORKDIR/export/judge)."""
  import flax
  import jax
  import jax.numpy as jnp

  from qwen_image_rl.judges import vlm_judge
  from qwen_image_rl.trainers import reward_sft
  from tests import tiny_reference

  workdir = tmp_path_factory.mktemp("judge_run")
  config = tiny_reference.tiny_judge_config()
  tokenizer = vlm_judge.build_judge_tokenizer(str(workdir / "tokenizer"))
  model = reward_sft.build_model(config, tokenizer)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = flax.linen.unbox(params)  # plain arrays, as a trained judge saves them
  judge = vlm_judge.VLMJudge(model, params, tokenizer, reward_sft.build_processor(config))
  judge.save(str(workdir / "export" / "judge"))
  return workdir


@pytest.mark.torch
def test_judge_rater_scores_with_the_judge(tmp_path, tiny_t2i_pipeline_dir, tiny_judge_dir):
  """--rater=WORKDIR of a judge: every image scored by its alignment readout, none invalid
  without CoT; the mean scores are the judge's own on the same samples."""
  import types

  from qwen_image_rl import evaluation
  from qwen_image_rl.data import examples
  from qwen_image_rl.judges.rewards import load_judge
  from qwen_image_rl.pipelines import QwenImagePipeline

  result = arena.run(
    [
      "--pipelines",
      f"a={tiny_t2i_pipeline_dir}@4",
      f"b={tiny_t2i_pipeline_dir}@1",
      f"--rater={tiny_judge_dir}",
      "--judge_cot=0",
      "--battles=4",
      "--tasks=t2i",
      "--num_steps=2",
      "--image_size=32",
      "--bootstrap=10",
      f"--out={tmp_path / 'arena'}",
    ]
  )
  judge_dir = str(tiny_judge_dir / "export" / "judge")
  assert result["rater"] == judge_dir and result["judge_cot"] is False
  assert result["invalid"] == {"t2i": {"a": 0, "b": 0}}
  assert result["ratings"]["t2i"]["battles"] == 4
  prompts = examples.t2i_examples(7919, 4, "val", 32)
  sampling = types.SimpleNamespace(
    negative_prompt="", cfg_scale=4.0, num_steps=2, image_size=32, max_text_tokens=48, batch_size=32
  )
  images = evaluation.sample_t2i(
    QwenImagePipeline.from_pretrained(tiny_t2i_pipeline_dir), prompts.prompts, sampling, 0
  )
  own = load_judge(judge_dir).score("alignment", images, list(prompts.prompts), cot=False)
  assert result["mean_score"]["t2i"]["a"] == pytest.approx(float(np.mean(own.reward)), abs=1e-6)
