"""Sample-efficiency curves: RL objectives trained from one base at an equal rollout budget.

  python -m qwen_image_rl.rl_curves --init_from=runs/demo/base/export/pipeline \
      --workdir=runs/curves_t2i --task=t2i --objectives=grpo,nft,awm --rollouts=3072 \
      [--eval_every=512] [--num_eval=64] [--set=rl.fm_draws=8]

Each objective runs the grpo trainer (through `runner.run`, so exactly what `main` runs) in
WORKDIR/<objective> for rollouts // batch iterations: 'grpo' from configs/grpo_{task}.py:tiny
(the paper's GRPO), the others from configs/rl_{task}.py:tiny with rl.objective replaced
(`OBJECTIVE@VARIANT` takes configs/rl_{task}.py:VARIANT instead, e.g.
`nft@judge_no_cot=runs/judge/export/judge`: RL on a learned judge, whose reward is then the
curve's training reward, beside the held-out oracle; its run directory is `run_name`). The
held-out oracle is evaluated every `eval_every` rollouts (rounded to whole iterations) and the
base once (its scores are every curve's first point). A finished run is skipped, an interrupted
one resumes. Writes WORKDIR/curves.csv and WORKDIR/curves.png: the held-out score (capped, soft
and strict) and the training reward (the trainer's composite over its last iterations) against
rollouts consumed, so a training reward that rises while the oracle does not (reward gaming)
shows. --set overrides apply to every objective's config.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS

# Held-out metric columns per task: (csv column, key in the eval JSON's task section).
METRICS = {
  "t2i": (
    ("heldout_capped", "overall"),
    ("heldout_soft", "overall_mean"),
    ("heldout_strict", "strict"),
  ),
  "edit": (
    ("heldout_capped", "instruction_following"),
    ("heldout_soft", "instruction_following_mean"),
    ("heldout_strict", "strict"),
    ("preservation", "preservation"),
    ("identity", "identity"),
  ),
}


def _define_flags():
  flags.DEFINE_string("workdir", "runs/curves", "One subdirectory per objective.")
  flags.DEFINE_string("init_from", "runs/demo/base/export/pipeline", "The base pipeline.")
  flags.DEFINE_enum("task", "t2i", ("t2i", "edit"), "Which task's configs.")
  flags.DEFINE_list("objectives", ["grpo", "nft", "awm"], "Registered RL objectives.")
  flags.DEFINE_integer("rollouts", 3072, "Rollout budget of every objective.")
  flags.DEFINE_integer("eval_every", 512, "Rollouts between held-out evaluations.")
  flags.DEFINE_integer("num_eval", 0, "Held-out prompts/edits (0: the config's).")
  flags.DEFINE_multi_string("set", [], "Config override key=value for every objective's run.")


def parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def objective_config(
  objective: str,
  task: str,
  init_from: str,
  rollouts: int,
  eval_every: int,
  num_eval: int,
  overrides,
  eval_base: bool,
):
  """The run config of one objective, `OBJECTIVE` or `OBJECTIVE@VARIANT` (see the module
  docstring)."""
  from configs import grpo_edit, grpo_t2i, rl_edit, rl_t2i  # run from the repo root
  from qwen_image_rl import config_lib

  objective, _, variant = objective.partition("@")
  if objective == "grpo":
    if variant:
      raise config_lib.ConfigError(f"grpo@{variant}: variants apply to configs/rl_{task}.py only")
    c = (grpo_t2i if task == "t2i" else grpo_edit).get_config("tiny")
  else:
    try:
      c = (rl_t2i if task == "t2i" else rl_edit).get_config(variant or "tiny")
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    c.rl.objective = objective
  c.update_from_flattened_dict(dict(overrides))
  c.init_from = init_from
  batch = c.rl.prompts_per_step * c.rl.group_size
  c.total_steps = max(1, rollouts // batch)
  c.eval.every = max(1, math.ceil(eval_every / batch))
  c.eval.at_start = eval_base
  if num_eval:
    c.eval.update(dict(num_t2i=num_eval) if task == "t2i" else dict(num_edits=num_eval))
  c.checkpoint.every = c.eval.every
  return c


def run_name(entry: str) -> str:
  """The run's subdirectory: the entry with path characters replaced ("nft@judge=runs/j/export/
  judge" -> "nft@judge_runs_j_export_judge")."""
  return re.sub(r"[^A-Za-z0-9_.@-]+", "_", entry)


def short_label(entry: str) -> str:
  """A legend label: a judge variant's directory shortened to its run ("nft@judge_no_cot=
  runs/judge_1600/export/judge" -> "nft@judge_no_cot=judge_1600")."""
  head, sep, path = entry.partition("=")
  if not sep:
    return entry
  parts = [p for p in path.split("/") if p]
  run = parts[parts.index("export") - 1] if "export" in parts[1:] else (parts or [path])[-1]
  return f"{head}={run}"


def read_curve(run_dir: str, objective: str, task: str, batch: int) -> list[dict]:
  """Rows of the CSV from a run's results/eval_<iteration>.json files."""
  directory = os.path.join(run_dir, "results")
  rows = []
  for name in sorted(os.listdir(directory) if os.path.isdir(directory) else []):
    if not (name.startswith("eval_") and name.endswith(".json")):
      continue
    with open(os.path.join(directory, name)) as f:
      result = json.load(f)
    it = int(result["step"])
    row = {
      "objective": objective,
      "iteration": it,
      "rollouts": it * batch,
      "train_reward": result.get("rewards", {}).get("composite/mean", float("nan")),
      "eval_seconds": result.get("eval_seconds", float("nan")),
    }
    section = result.get(task, {})
    row.update({col: section.get(key, float("nan")) for col, key in METRICS[task]})
    rows.append(row)
  return sorted(rows, key=lambda r: r["iteration"])


def with_base(rows_by_objective: dict[str, list[dict]]) -> dict[str, list[dict]]:
  """Every curve starts at the base's evaluation (made once, by the first objective)."""
  base = next((r for rows in rows_by_objective.values() for r in rows if r["iteration"] == 0), None)
  if base is None:
    return rows_by_objective
  out = {}
  for name, rows in rows_by_objective.items():
    start = [] if rows and rows[0]["iteration"] == 0 else [dict(base, objective=name)]
    out[name] = start + rows
  return out


def write_csv(path: str, rows_by_objective, task: str) -> None:
  columns = (
    ["objective", "iteration", "rollouts", "train_reward"]
    + [c for c, _ in METRICS[task]]
    + ["eval_seconds"]
  )
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for rows in rows_by_objective.values():
      writer.writerows(rows)


def plot(path: str, rows_by_objective, task: str):
  """Writes the curves' PNG to `path` and returns the figure. A pyplot-free Figure, so it
  leaves the process's matplotlib backend (a notebook's inline one) as it is. Edit curves get a
  middle panel with preservation and identity, which the edit targets bound from below."""
  from matplotlib.figure import Figure

  panels = 3 if task == "edit" else 2
  fig = Figure(figsize=(5.5 * panels, 5))
  axes = fig.subplots(1, panels)
  held, train = axes[0], axes[-1]
  label = "T2I overall" if task == "t2i" else "instruction following"
  for i, (entry, rows) in enumerate(rows_by_objective.items()):
    colour, name = f"C{i}", short_label(entry)
    x = [r["rollouts"] for r in rows]
    held.plot(x, [r["heldout_capped"] for r in rows], "-o", color=colour, label=f"{name} capped")
    held.plot(x, [r["heldout_soft"] for r in rows], ":", color=colour, label=f"{name} soft")
    held.plot(x, [r["heldout_strict"] for r in rows], "--", color=colour, label=f"{name} strict")
    if task == "edit":
      kept = axes[1]
      kept.plot(x, [r["preservation"] for r in rows], "-o", color=colour, label=f"{name} preserv.")
      kept.plot(x, [r["identity"] for r in rows], "--", color=colour, label=f"{name} identity")
    train.plot(
      [r["rollouts"] for r in rows if r["iteration"] > 0],
      [r["train_reward"] for r in rows if r["iteration"] > 0],
      "-o",
      color=colour,
      label=name,
    )
  held.set(
    xlabel="rollouts consumed",
    ylabel=f"held-out oracle ({label})",
    title=f"{task}: held-out oracle",
  )
  if task == "edit":
    axes[1].set(xlabel="rollouts consumed", ylabel="held-out oracle", title="edit: what to keep")
  train.set(
    xlabel="rollouts consumed",
    ylabel="training composite reward",
    title=f"{task}: training reward (reward model's view)",
  )
  for ax in axes:  # below the axes, so no legend hides a curve
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  return fig


def run_curves(
  workdir: str,
  task: str,
  objectives,
  init_from: str,
  rollouts: int,
  eval_every: int,
  num_eval: int = 0,
  overrides=(),
) -> dict[str, list[dict]]:
  """Train every objective (skipping finished runs), then write curves.csv and curves.png.
  Returns the curves {objective: rows}. Raises ConfigError / KeyError before any training."""
  from qwen_image_rl import runner, trainers
  from qwen_image_rl.trainers.common import final_checkpoint_exists

  configs = {}
  for i, name in enumerate(objectives):
    configs[name] = objective_config(
      name, task, init_from, rollouts, eval_every, num_eval, overrides, eval_base=(i == 0)
    )
    trainers.validate(configs[name])  # every run is checked before the first one trains
  for name, config in configs.items():
    run_dir = os.path.join(workdir, run_name(name))
    if final_checkpoint_exists(run_dir, config.total_steps):
      print(f"== {name}: final checkpoint exists in {run_dir}, skipped", flush=True)
      continue
    start = time.time()
    print(
      f"== {name}: {config.total_steps} iterations x "
      f"{config.rl.prompts_per_step * config.rl.group_size} rollouts -> {run_dir}",
      flush=True,
    )
    runner.run(config, run_dir)
    print(f"== {name}: {time.time() - start:.0f} s wall", flush=True)
  rows = with_base(
    {
      name: read_curve(
        os.path.join(workdir, run_name(name)), name, task, c.rl.prompts_per_step * c.rl.group_size
      )
      for name, c in configs.items()
    }
  )
  write_csv(os.path.join(workdir, "curves.csv"), rows, task)
  plot(os.path.join(workdir, "curves.png"), rows, task)
  print(f"wrote {workdir}/curves.csv and curves.png", flush=True)
  return rows


def main(argv):
  del argv
  from qwen_image_rl import config_lib

  overrides = [(k, parse_value(v)) for k, v in (s.split("=", 1) for s in FLAGS.set)]
  try:
    run_curves(
      FLAGS.workdir,
      FLAGS.task,
      FLAGS.objectives,
      FLAGS.init_from,
      FLAGS.rollouts,
      FLAGS.eval_every,
      FLAGS.num_eval,
      overrides,
    )
  except (config_lib.ConfigError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from qwen_image_rl import host_memory

  host_memory.tune_malloc()
  _define_flags()
  app.run(main)
