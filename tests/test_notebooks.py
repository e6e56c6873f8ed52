"""Every notebook in notebooks/ runs top to bottom in its short form (what CI runs).

Each notebook executes in a fresh Jupyter kernel (nbclient) with QWEN_IMAGE_RL_NOTEBOOK_SHORT=1;
a cell that raises fails the test. The notebook's last cell prints its results as one JSON line
(`notebook_lib.report`); the test checks that the keys the notebook promises are there and that
every number is finite. The kernels share one persistent compilation cache (the micro RL runs of
several notebooks compile the same programs) and compile with XLA's cheap CPU backend settings:
at micro size compiling costs far more than running.
"""

import glob
import math
import os
import resource
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from qwen_image_rl import notebook_lib  # noqa: E402

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
# Cheap XLA:CPU compilation (no LLVM optimisation): halves a micro RL run's time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# Correlations are NaN where undefined (under 3 valid outputs, or a constant score).
MAY_BE_NAN = {"spearman", "pearson", "pairwise_accuracy"}


def _numbers(tree, path=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k not in MAY_BE_NAN:
        yield from _numbers(v, f"{path}/{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _numbers(v, f"{path}[{i}]")
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, float(tree)


def _scores(results, key):
  """The values of `key` in every dict of `results` (a list of rows or a dict of dicts)."""
  rows = results.values() if isinstance(results, dict) else results
  return [r[key] for r in rows]


def _unit(values):
  return all(0.0 <= v <= 1.0 for v in values)


# What each notebook's results must hold, beyond "every number is finite".
def _check_quickstart(r):
  assert r["pipelines"], "no pipeline was evaluated"
  for name, row in r["pipelines"].items():
    assert _unit(row.values()), (name, row)
  assert len(r["sweep"]) >= 2 and _unit(_scores(r["sweep"], "capped"))


def _check_timestep_cfg(r):
  variants = {row["variant"]: row for row in r["variants"]}
  assert {"high_noise", "uniform", "all", "cfg_both", "cfg_none"} <= set(variants)
  assert {variants["uniform"]["timesteps"], variants["cfg_none"]["cfg_mode"]} == {"uniform", "none"}
  for row in variants.values():
    assert _unit([row["before"], row["after"], row["train_reward"]]), row
  # Every variant starts from the same base evaluation.
  assert len({row["before"] for row in variants.values()}) == 1


def _check_rl_objectives(r):
  assert set(r["curves"]) == {"grpo", "nft", "awm"}
  for name, curve in r["curves"].items():
    assert curve["rollouts"][0] == 0 and curve["rollouts"] == sorted(curve["rollouts"]), name
    assert len(curve["rollouts"]) >= 2 and _unit(curve["heldout_capped"]), name


def _check_reward_models(r):
  judges = {(row["judge"], row["mode"], row["task"]) for row in r["calibration"]}
  for judge, mode in (("pointwise", "cot"), ("pointwise", "no_cot"), ("pairwise", "no_cot")):
    assert {(judge, mode, t) for t in ("alignment", "aesthetics", "portrait")} <= judges
  for row in r["calibration"]:
    assert 0 <= row["invalid"] <= row["n"] and row["n"] > 0, row
    assert math.isnan(row["spearman"]) or -1.0 <= row["spearman"] <= 1.0, row
  no_cot = [row["spearman"] for row in r["calibration"] if row["mode"] == "no_cot"]
  assert any(math.isfinite(v) for v in no_cot), "no judge produced a correlation"
  runs = {row["reward"]: row for row in r["rl"]}
  assert set(runs) == {"oracle", "judge"}
  for row in runs.values():
    assert _unit([row["heldout_before"], row["heldout_after"]]), row


def _check_opd_vs_mixrl(r):
  rows = r["rows"]
  assert {"base_cfg4", "base_cfg1", "teacher_t2i_cfg4", "teacher_edit_cfg4"} <= set(rows)
  assert {"mix_rl_cfg4", "student_cfg1"} <= set(rows)
  for label, row in rows.items():
    assert _unit([row["t2i_capped"], row["edit_instruction_following"]]), label
    assert row["images_per_second"] > 0, label


CHECKS = {
  "quickstart": _check_quickstart,
  "timestep_cfg": _check_timestep_cfg,
  "rl_objectives": _check_rl_objectives,
  "reward_models": _check_reward_models,
  "opd_vs_mixrl": _check_opd_vs_mixrl,
}


def _outputs_text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        parts.append(out["text"])
  return "".join(parts)


def test_notebooks_are_stored_without_outputs_and_open_as_documented():
  import nbformat

  assert {os.path.basename(p)[:-6] for p in NOTEBOOKS} == set(CHECKS)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    name = os.path.basename(path)
    assert nb.cells[0].cell_type == "markdown" and "Time" in nb.cells[0].source, name
    install = nb.cells[1]
    assert install.cell_type == "code" and "google.colab" in install.source, name
    assert "QWEN_IMAGE_RL_COLAB_INSTALL" in install.source, name
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{name}: clear its outputs"
    assert "nl.report(" in nb.cells[-1].source, name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p)[:-6] for p in NOTEBOOKS])
def test_notebook_runs_in_short_form(path, tmp_path_factory, monkeypatch):
  import nbclient
  import nbformat

  name = os.path.basename(path)[:-6]
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this run's workers
  monkeypatch.setenv(notebook_lib.SHORT_ENV, "1")
  monkeypatch.setenv(notebook_lib.WORKDIR_ENV, str(tmp_path_factory.mktemp(name)))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(shared / "notebooks_compilation_cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)  # one CPU device, unlike the test processes
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
  )
  cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.time()
  client.execute()  # raises CellExecutionError naming the cell if any cell raises
  used = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu_seconds = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
  print(f"{name}: {time.time() - start:.1f} s wall, {cpu_seconds:.1f} s CPU in the kernel")
  results = notebook_lib.parse_report(_outputs_text(nb))
  bad = [(p, v) for p, v in _numbers(results) if not math.isfinite(v)]
  assert not bad, f"non-finite results: {bad}"
  CHECKS[name](results)
  pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert pngs, f"{name} drew no plot or image inline"


def test_short_switch_and_results_line(monkeypatch, capsys):
  for value, short in (("1", True), ("true", True), ("0", False), ("", False)):
    monkeypatch.setenv(notebook_lib.SHORT_ENV, value)
    assert notebook_lib.short_mode() is short
  monkeypatch.setenv(notebook_lib.SHORT_ENV, "fast")
  with pytest.raises(ValueError, match="QWEN_IMAGE_RL_NOTEBOOK_SHORT"):
    notebook_lib.short_mode()
  notebook_lib.report({"a": {"b": 0.25}, "n": [1, 2]})
  printed = "noise\n" + capsys.readouterr().out + "more\n"
  assert notebook_lib.parse_report(printed) == {"a": {"b": 0.25}, "n": [1, 2]}
  with pytest.raises(ValueError, match="NOTEBOOK_RESULTS"):
    notebook_lib.parse_report("nothing here")
  table = notebook_lib.markdown_table([{"x": 0.5, "y": "a"}, {"x": 1}]).splitlines()
  assert table == ["| x | y |", "|---|---|", "| 0.500 | a |", "| 1 |  |"]


def test_random_params_follow_the_init_rules():
  import jax
  import numpy as np

  abstract = {
    "dense": {
      "kernel": jax.ShapeDtypeStruct((64, 32), np.float32),
      "bias": jax.ShapeDtypeStruct((32,), np.float32),
    },
    "norm": {"scale": jax.ShapeDtypeStruct((32,), np.float32)},
    "embed": {"embedding": jax.ShapeDtypeStruct((100, 16), np.float32)},
  }
  p = notebook_lib.random_params(abstract, seed=0)
  assert p["dense"]["kernel"].shape == (64, 32) and p["dense"]["kernel"].dtype == np.float32
  assert 0.09 < p["dense"]["kernel"].std() < 0.16  # 1 / sqrt(fan_in = 64) = 0.125
  assert not p["dense"]["bias"].any() and (p["norm"]["scale"] == 1).all()
  assert 0.9 < p["embed"]["embedding"].std() < 1.1
  again = notebook_lib.random_params(abstract, seed=0)
  assert (again["dense"]["kernel"] == p["dense"]["kernel"]).all()


@pytest.mark.parametrize(
  "module,variant",
  [
    ("grpo_t2i", "tiny"),
    ("grpo_edit", "tiny"),
    ("rl_t2i", "tiny"),
    ("rl_edit", "tiny"),
    ("rl_mix", "tiny"),
    ("opd", "tiny"),
    ("judge", "tiny_pairwise"),
  ],
)
def test_shrink_gives_valid_micro_configs(module, variant):
  import importlib

  from qwen_image_rl import trainers

  config = importlib.import_module(f"configs.{module}").get_config(variant)
  overrides = notebook_lib.micro_overrides(config)
  micro = notebook_lib.shrink(config.copy_and_resolve_references())
  trainers.validate(micro)
  # micro_overrides is exactly what shrink changed, and leaves its argument alone.
  again = config.copy_and_resolve_references()
  again.update_from_flattened_dict(overrides)
  assert again.to_dict() == micro.to_dict()
  assert overrides and config.to_dict() != micro.to_dict()
  assert micro.checkpoint.async_save is False and micro.log.images_every == 0
  sections = [micro.tasks[t] for t in micro.tasks] if "tasks" in micro else [micro]
  for section in sections:
    if "rl" in section:
      assert section.rl.group_size * section.rl.prompts_per_step == 8
      assert section.data.image_size == notebook_lib.MICRO_IMAGE_SIZE
  if "eval" in micro and "num_t2i" in micro.eval:
    assert micro.eval.num_t2i <= 8 and micro.eval.num_edits <= 4 and micro.eval.num_steps == 4
  if module == "judge":
    assert micro.model.text.num_hidden_layers == 1 and micro.judge.max_cot_tokens == 4


def test_shrink_keeps_the_demo_students_share_of_trained_states(tmp_path):
  from qwen_image_rl import demo, trainers

  opd = dict(demo.stages(str(tmp_path)))["opd"]
  assert 0 < opd.opd.num_train_steps < opd.opd.num_steps  # the demo trains a subset
  micro = notebook_lib.shrink(opd.copy_and_resolve_references())
  trainers.validate(micro)  # K = 7 of 10 would not fit the micro run's 4 steps
  assert (micro.opd.num_train_steps, micro.opd.num_steps) == (3, 4)


def test_all_timesteps_variant_stays_valid_when_shrunk():
  from configs import grpo_t2i
  from qwen_image_rl import grpo_ablation, trainers

  overrides = notebook_lib.micro_overrides(grpo_t2i.get_config("tiny")).items()
  c = grpo_ablation.variant_config("all", "base", 1, 8, overrides=overrides)
  assert c.rl.num_steps == c.rl.timesteps.num_train == c.rl.timesteps.first_m == 4
  trainers.validate(c)
  c = grpo_ablation.variant_config("uniform", "base", 1, 8, overrides=overrides)
  assert (c.rl.timesteps.strategy, c.rl.timesteps.num_train, c.rl.num_steps) == ("uniform", 2, 4)
  judged = grpo_t2i.with_judge_rewards(grpo_t2i.get_config("tiny"), "judge_dir", cot=False)
  assert judged.rewards.names == ("judge_alignment", "judge_aesthetics", "judge_portrait")
  assert dict(judged.rl.category_weights.portrait) == {
    "judge_alignment": 0.6,
    "judge_aesthetics": 0.05,
    "judge_portrait": 0.35,
  }
  trainers.validate(judged)
