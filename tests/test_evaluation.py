"""Held-out eval sets: rendered once per process, shared read-only, keyed by every setting."""

import ml_collections
import numpy as np
import pytest

from qwen_image_rl import evaluation


def _cfg(**kw):
  return ml_collections.ConfigDict(
    dict(dict(split="val", num_t2i=4, num_edits=2, image_size=32), **kw)
  )


def test_eval_sets_are_rendered_once_and_read_only():
  t2i, edits = evaluation.eval_sets(_cfg(), seed=3)
  again_t2i, again_edits = evaluation.eval_sets(_cfg(), seed=3)
  assert again_t2i is t2i and again_edits is edits
  assert len(t2i) == 4 and len(edits) == 2
  with pytest.raises(ValueError, match="read-only"):
    t2i.images[0, 0, 0, 0] = 1
  with pytest.raises(ValueError, match="read-only"):
    edits.sources[0, 0, 0, 0] = 1
  # Another seed or size is another set, not the cached one.
  other, _ = evaluation.eval_sets(_cfg(), seed=4)
  assert other is not t2i and other.prompts != t2i.prompts
  small, none = evaluation.eval_sets(_cfg(image_size=16, num_edits=0), seed=3)
  assert small.images.shape[1:3] == (16, 16) and none is None
  np.testing.assert_array_equal(t2i.images, evaluation.eval_sets(_cfg(), seed=3)[0].images)


def test_summaries_hold_capped_uncapped_and_strict_scores():
  from qwen_image_rl.data import edits as E
  from qwen_image_rl.data import oracle, render, world

  specs = world.sample_scenes(4, 8, split="val")
  images = [render.render(s) for s in specs]
  images[0] = np.full_like(images[0], 128)  # one failure: it must lower strict by category
  t2i = evaluation.summarise_t2i(oracle.score_t2i_batch(images, specs), [s.category for s in specs])
  failed = specs[0].category
  assert t2i["strict_by_category"][failed] == 0.5
  assert all(v == 1.0 for c, v in t2i["strict_by_category"].items() if c != failed)
  assert t2i["strict"] == 0.875  # categories weigh equally: (0.5 + 1 + 1 + 1) / 4
  assert t2i["by_category"][failed] < t2i["by_category_mean"][failed] < 0.99
  assert t2i["overall"] < t2i["overall_mean"]
  # Per-prompt scores, for paired comparisons: their category-weighted mean is `overall`, so a
  # paired difference of two evaluations is the difference of their headline numbers.
  per, cats = np.array(t2i["per_prompt"]), t2i["per_prompt_category"]
  assert cats == [s.category for s in specs]
  diff, _ = evaluation.paired_difference(per, np.zeros_like(per), groups=cats)
  assert diff == pytest.approx(t2i["overall"])
  edits = E.sample_edits(5, 7, split="val")
  sources = [render.render(e.source) for e in edits]
  outputs = [render.render(e.target) for e in edits]
  outputs[0] = sources[0]  # an edit that ignores its instruction
  e = evaluation.summarise_edits(oracle.score_edit_batch(sources, outputs, edits), edits)
  assert e["strict"] == 6 / 7 and e["strict_by_kind"][edits[0].kind] == 0.0
  assert e["instruction_following"] < e["instruction_following_mean"]
  assert np.mean(e["per_edit_instruction_following"]) == pytest.approx(e["instruction_following"])


def test_strict_blockers_name_the_one_check_a_defect_fails():
  from qwen_image_rl.data import oracle, render, world

  # Landscapes whose sun or moon is painted over with the sky: each fails its body checks and
  # nothing else, so the blockers must say exactly that, and only for those prompts.
  specs = [s for s in world.sample_scenes(11, 40, split="val") if s.category == "landscape"][:4]
  specs += [s for s in world.sample_scenes(12, 40, split="val") if s.category == "general"][:2]
  images = [render.render(s) for s in specs]
  for i in (0, 1):
    size = images[i].shape[0]
    cx, cy = world.body_center(specs[i].body_pos, specs[i].horizon)
    ys, xs = np.mgrid[:size, :size] / size
    near = np.hypot(xs - cx, ys - cy) < 2 * world.BODY_RADIUS
    images[i][near] = world.SKY_COLOURS[specs[i].sky]
  scores, checks = oracle.score_and_check_t2i_batch(images, specs)
  assert [c == oracle.t2i_checks(im, s) for c, im, s in zip(checks, images, specs)] == [True] * 6
  assert [x["strict"] for x in scores] == [0, 0, 1, 1, 1, 1]
  assert oracle.failed_check_kinds(checks[0]) == ("body", "body_position", "body_solid")
  t2i = evaluation.summarise_t2i(scores, [s.category for s in specs], checks)
  assert t2i["check_pass"]["landscape/body"] == 0.5
  assert t2i["check_pass"]["landscape/sky"] == 1.0
  assert t2i["check_pass"]["general/shape/colour"] == 1.0  # item indices pooled into a kind
  assert not any("shape0" in k for k in t2i["check_pass"])
  # Three kinds fail together: no single fix would make them pass.
  assert t2i["only_failure"]["landscape/body"] == 0.0
  assert t2i["failed_kinds"]["landscape"] == [0.5, 0.0, 0.0, 0.5]
  assert t2i["failed_kinds"]["general"] == [1.0, 0.0, 0.0, 0.0]
  # A defect with one failing kind is that kind's only failure.
  solo = {"sky": 1.0, "body": 0.2, "body_count": 1.0}
  one = evaluation.strict_blockers([solo, solo, {**solo, "body": 1.0}], ["landscape"] * 3)
  assert one["only_failure"]["landscape/body"] == pytest.approx(2 / 3)
  assert one["only_failure"]["landscape/sky"] == 0.0
  # Count checks keep their own threshold (0.7).
  assert oracle.failed_check_kinds({"shape0/count": 0.6, "shape1/colour": 0.6}) == ("shape/count",)


def test_paired_difference_standard_error_is_calibrated():
  # Two correlated models scored on the same 4 x 32 items, repeated over many evaluations: the
  # reported SE must match the spread of the estimated difference, and be far below the
  # unpaired error that the item-to-item spread gives each model alone.
  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(4), 32)
  group_means = np.array([0.2, 0.4, 0.5, 0.05])
  diffs, ses, unpaired = [], [], []
  for _ in range(400):
    item = group_means[groups] + rng.normal(0, 0.2, groups.shape)  # what the prompt allows
    a = item + rng.normal(0, 0.05, groups.shape)
    b = item + 0.03 + rng.normal(0, 0.05, groups.shape)
    d, se = evaluation.paired_difference(a, b, groups=groups)
    diffs.append(d)
    ses.append(se)
    unpaired.append(np.hypot(*(x.std(ddof=1) / np.sqrt(len(x)) for x in (a, b))))
  assert np.mean(diffs) == pytest.approx(-0.03, abs=0.002)
  assert np.median(ses) == pytest.approx(np.std(diffs), rel=0.1)
  assert np.median(ses) < np.median(unpaired) / 3
  with pytest.raises(ValueError, match="group labels"):
    evaluation.paired_difference([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], groups=[0, 1])
  # Results of evaluations of different sizes do not pair (numpy would broadcast a single item).
  for b in ([0.1], [0.1, 0.2]):
    with pytest.raises(ValueError, match="equal-length"):
      evaluation.paired_difference([0.1, 0.2, 0.3], b)


def test_sample_grid_rejects_bad_pipeline_arguments(tmp_path):
  from configs import common
  from qwen_image_rl import sample_grid

  assert sample_grid.parse_pipelines(["base=a", "grpo=b/c"]) == {"base": "a", "grpo": "b/c"}
  with pytest.raises(ValueError, match="expected name=DIR"):
    sample_grid.parse_pipelines(["runs/demo/base"])
  with pytest.raises(ValueError, match="twice"):
    sample_grid.parse_pipelines(["a=x", "a=y"])
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    sample_grid.load_pipelines("/nonexistent/pipeline")
  assert sample_grid.split_cfg("runs/demo/opd@1") == ("runs/demo/opd", 1.0)
  assert sample_grid.split_cfg("runs/demo/base") == ("runs/demo/base", None)
  judge_run = tmp_path / "nft@judge_runs_j_export_judge"  # an rl_curves run directory
  judge_run.mkdir()
  assert sample_grid.split_cfg(str(judge_run)) == (str(judge_run), None)
  assert sample_grid.split_cfg(f"{judge_run}@1.5") == (str(judge_run), 1.5)
  # --score_split=test scores other held-out prompts than the default val split.
  val, test = (sample_grid.score_config(4, 2, split) for split in ("val", "test"))
  assert (val.split, val.num_t2i, val.num_edits, test.split) == ("val", 4, 2, "test")
  val_prompts = evaluation.eval_sets(val, seed=0)[0].prompts
  assert not set(val_prompts) & set(evaluation.eval_sets(test, seed=0)[0].prompts)
  for bad in ("runs/demo/opd@x", "runs/demo/opd@0", "@4"):
    with pytest.raises(ValueError, match="CFG"):
      sample_grid.split_cfg(bad)
  eval_cfg = sample_grid.with_cfg_scale(common.tiny_eval(), 1.0)
  assert eval_cfg.cfg_scale == 1.0 and common.tiny_eval().cfg_scale == 4.0


def test_sample_grid_compares_every_pipeline_with_the_first():
  from qwen_image_rl import sample_grid

  cats = ["general", "portrait"] * 3
  base = {
    "t2i": {"per_prompt": [0.1, 0.5, 0.2, 0.6, 0.3, 0.7], "per_prompt_category": cats},
    "edit": {"per_edit_instruction_following": [0.2, 0.4, 0.6]},
  }
  better = {
    "t2i": {"per_prompt": [0.2, 0.6, 0.3, 0.7, 0.4, 0.8], "per_prompt_category": cats},
    "edit": {"per_edit_instruction_following": [0.1, 0.4, 0.5]},
  }
  t2i_only = {"t2i": better["t2i"]}
  lines = sample_grid.format_paired({"base": base, "rl": better, "t": t2i_only}).splitlines()
  assert lines[0].startswith("rl - base: T2I capped +0.100 (paired SE 0.000), edit IF -0.067")
  assert lines[1] == "t - base: T2I capped +0.100 (paired SE 0.000)"


def test_strict_blockers_benchmark_tables_each_column_and_rejects_bad_arguments(tmp_path, capsys):
  from benchmarks import strict_blockers

  good = {"sky": 1.0, "body": 1.0, "body_count": 1.0}
  columns = {
    name: evaluation.strict_blockers(rows, ["landscape"] * 2)
    | {"strict_by_category": {"landscape": strict}, "strict": strict}
    for name, rows, strict in (
      ("renders", [good, good], 1.0),
      ("samples", [{**good, "body": 0.1}, {**good, "body": 0.1, "sky": 0.0}], 0.0),
    )
  }
  lines = strict_blockers.table(columns).splitlines()
  assert lines[0] == "| check | pass: renders | pass: samples | only failure (samples) |"
  assert "| landscape/body | 1.00 | 0.00 | 0.500 |" in lines
  assert "| landscape/sky | 1.00 | 0.50 | 0.000 |" in lines
  assert lines[-1] == "| **strict, mean over categories** | 1.000 | 0.000 | |"
  for argv, message in (
    ([f"--pipeline={tmp_path}"], "no model_index.json"),
    ([f"--pipeline={tmp_path}", "--n=3"], "at least one prompt per category"),
  ):
    with pytest.raises(SystemExit):
      strict_blockers.main(argv)
    assert message in capsys.readouterr().err


def test_word_binding_reads_how_much_of_the_words_change_a_sample_reproduces():
  from benchmarks import word_binding

  rng = np.random.default_rng(0)
  renders_a, renders_b = rng.uniform(size=(2, 4, 8, 8, 3))
  noise = rng.normal(size=(4, 8, 8, 3))
  word_change = renders_a - renders_b
  exact = word_binding.binding(renders_a + noise, renders_b + noise, renders_a, renders_b)
  assert exact["reproduced"] == pytest.approx(1.0) and exact["cosine"] == pytest.approx(1.0)
  assert exact["reproduced_se"] == pytest.approx(0.0, abs=1e-12)
  ignored = word_binding.binding(noise, noise, renders_a, renders_b, noise + word_change)
  assert ignored["reproduced"] == 0.0 and ignored["noise / word"] == pytest.approx(1.0)
  half = word_binding.binding(noise + 0.5 * word_change, noise, renders_a, renders_b)
  assert half["reproduced"] == pytest.approx(0.5) and half["cosine"] == pytest.approx(1.0)
  # Pairs that disagree widen the error bar: one reproduced, one reversed.
  mixed = word_binding.binding(
    noise + word_change * np.array([1, 1, -1, -1])[:, None, None, None],
    noise,
    renders_a,
    renders_b,
  )
  assert mixed["reproduced_se"] > 0.3
  with pytest.raises(ValueError, match="identical"):
    word_binding.binding(noise, noise, renders_a, renders_a)
  # The PNG: a row per kind of its first pairs, render A | sample A | render B | sample B.
  stacks = {k: rng.integers(0, 255, (4, 3, 5, 5, 3), dtype=np.uint8) for k in ("a", "b")}
  grid = word_binding.pairs_grid(stacks, pairs=2, scale=1)
  assert grid.shape == (2 * 5 + 2, 8 * 5 + 7 * 2, 3)
  assert (grid[:5, 7:12] == stacks["a"][1, 0]).all()  # sample A of the first pair
  assert (grid[7:, 28:33] == stacks["b"][0, 1]).all()  # render A of the second pair, kind b


@pytest.mark.parametrize("kind", __import__("benchmarks.word_binding").word_binding.KINDS)
def test_word_binding_pairs_change_only_the_named_word(kind):
  from benchmarks import word_binding
  from qwen_image_rl.data import captions, render, world

  scenes_a, scenes_b = word_binding.scene_pairs(kind, 6)
  for a, b in zip(scenes_a, scenes_b):
    assert a.category == word_binding.KINDS[kind][0] and world.split_of(a) == "val"
    changed = [f for f in vars(a) if getattr(a, f) != getattr(b, f)]
    assert len(changed) == 1, changed
    words_a = captions.prompt(a, np.random.default_rng(1)).text.split()
    words_b = captions.prompt(b, np.random.default_rng(1)).text.split()
    # Same phrasing: the captions differ in the attribute's own phrase only (a, an; 1-3 words).
    assert 1 <= sum(x != y for x, y in zip(words_a, words_b)) <= 3
  renders_a, renders_b = (render.render_batch(s, 32) for s in (scenes_a, scenes_b))
  assert (renders_a != renders_b).any(axis=(1, 2, 3)).all()


def test_word_binding_benchmark_rejects_bad_arguments(tmp_path, capsys):
  from benchmarks import word_binding

  for argv, message in (
    ([f"--pipeline={tmp_path}"], "no model_index.json"),
    ([f"--pipeline={tmp_path}", "--kinds=portrait/nose"], "unknown ['portrait/nose']"),
    ([f"--pipeline={tmp_path}", "--n=0"], "at least one scene pair"),
  ):
    with pytest.raises(SystemExit):
      word_binding.main(argv)
    assert message in capsys.readouterr().err
