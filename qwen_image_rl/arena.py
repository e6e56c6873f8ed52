"""An image arena: pairwise battles on held-out tiny-world prompts, Bradley-Terry Elo with 95% CIs.

  python -m qwen_image_rl.arena --pipelines base=runs/demo/base rl=runs/demo/rl_t2i@4 \
      student=runs/demo/opd@1 --rater=oracle [--split=val] [--battles=600] \
      [--out=runs/demo/arena]

Every pipeline (NAME=DIR, DIR a diffusers-format pipeline or a workdir that exported one, with an
optional @CFG scale, default 4) samples the same held-out prompts from the same seeds. For each
prompt, every pair of pipelines battles once: the rater scores both images and the higher score
wins (a tie within --tie scores half). Ratings are fitted per category (the four T2I categories
and `edit`) and over all T2I prompts (`ratings.py`: Bradley-Terry, Elo scale, bootstrap
intervals), then written as arena.json, arena.md and arena.png in --out.

The paper's arena uses human raters; ours is the tiny world's oracle, which training never sees,
or a learned judge: `--rater=JUDGE_DIR` (a reward_sft export, WORKDIR/export/judge, or its
workdir) scores T2I images by its alignment rubric and edits by instruction following, with its
chain of thought unless `--judge_cot=0`. A judge output without a parsable score is invalid: its
battles are left out and the count is reported per player (arena.json `invalid`). `--battles`
is per task: the number of prompts is battles / (number of pairs), rounded up.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import types

import numpy as np

from qwen_image_rl import host_memory, paths, ratings
from qwen_image_rl.data import examples, oracle, world

TASKS = ("t2i", "edit")


class ArenaError(ValueError):
  """Bad arena arguments (pipelines, rater, sizes); the message names the fix."""


def split_cfg(spec: str) -> tuple[str, float | None]:
  """'DIR@CFG' -> (DIR, CFG); 'DIR' -> (DIR, None). A scale that is not a number raises
  ValueError naming it. An existing directory is taken whole, '@' and all (rl_curves names its
  judge runs `nft@judge_...`)."""
  if os.path.isdir(spec):
    return spec, None
  directory, at, cfg = spec.rpartition("@")
  if not at:
    return spec, None
  try:
    return directory, float(cfg)
  except ValueError:
    raise ValueError(f"CFG scale {cfg!r} is not a number") from None


def parse_player(text: str) -> tuple[str, str, float]:
  """'NAME=DIR[@CFG]' -> (name, pipeline directory, cfg scale)."""
  name, sep, rest = text.partition("=")
  if not sep or not name or not rest:
    raise ArenaError(f"--pipelines entry {text!r}: expected NAME=DIR or NAME=DIR@CFG")
  try:
    directory, scale = split_cfg(rest)
  except ValueError as e:
    raise ArenaError(f"--pipelines entry {text!r}: {e}") from None
  scale = 4.0 if scale is None else scale
  from qwen_image_rl.pipelines.common import require_pipeline_dir  # lazy: jax

  return name, require_pipeline_dir(directory, f"--pipelines entry {name}", ArenaError), scale


def pair_outcomes(scores: np.ndarray, tie: float) -> list[tuple[int, int, float, int]]:
  """Battles (a, b, outcome, prompt) from per-player scores [P, n]: every pair on every prompt
  where both were scored (NaN, a judge's invalid output, sits its battles out)."""
  out = []
  for k in range(scores.shape[1]):
    for a, b in itertools.combinations(range(scores.shape[0]), 2):
      diff = scores[a, k] - scores[b, k]
      if np.isnan(diff):
        continue
      out.append((a, b, 0.5 if abs(diff) <= tie else float(diff > 0), k))
  return out


def _sampling(args, cfg_scale: float):
  return types.SimpleNamespace(
    negative_prompt="",
    cfg_scale=cfg_scale,
    num_steps=args.num_steps,
    image_size=args.image_size,
    max_text_tokens=48,
    batch_size=args.batch_size,
  )


class OracleRater:
  """The tiny world's oracle: its capped overall score per image."""

  def t2i(self, images, t2i) -> list[float]:
    return [s["overall"] for s in oracle.score_t2i_batch(images, t2i.specs)]

  def edit(self, images, edits) -> list[float]:
    return [s["overall"] for s in oracle.score_edit_batch(edits.sources, images, edits.edits)]


class JudgeRater:
  """A learned VLM judge: its reward (E[score] - 1) / 4, NaN where its output had no score."""

  def __init__(self, directory: str, cot: bool):
    from qwen_image_rl.judges.rewards import load_judge  # lazy: jax

    self.judge, self.cot = load_judge(directory), cot

  def t2i(self, images, t2i) -> np.ndarray:
    return self.judge.score("alignment", images, list(t2i.prompts), cot=self.cot).reward

  def edit(self, images, edits) -> np.ndarray:
    instructions = list(edits.instructions)
    return self.judge.score("instruction", images, instructions, edits.sources, cot=self.cot).reward


def judge_dir(rater: str) -> str:
  """The judge directory `--rater` names: DIR itself or DIR/export/judge (a reward_sft workdir)."""
  from qwen_image_rl.judges.vlm_judge import PREPROCESSOR_CONFIG, find_judge_dir  # lazy: jax

  found = find_judge_dir(rater)
  if found:
    return found
  raise ArenaError(
    f"--rater={rater!r}: neither 'oracle' nor a judge directory (config.json and "
    f"{PREPROCESSOR_CONFIG} in it or in its export/judge; reward_sft exports one)"
  )


def make_rater(args):
  return OracleRater() if args.rater == "oracle" else JudgeRater(args.judge_dir, args.judge_cot)


def score_players(players, args, num_prompts: int, rater=None) -> dict:
  """{task: (scores [P, n], categories [n])}: the rater's score per image (NaN: invalid)."""
  from qwen_image_rl import evaluation
  from qwen_image_rl.pipelines import QwenImageEditPipeline, QwenImagePipeline

  rater = rater or make_rater(args)
  t2i = examples.t2i_examples(args.seed + 7919, num_prompts, args.split, args.image_size)
  edits = examples.edit_examples(args.seed + 7919, num_prompts, args.split, args.image_size)
  out = {}
  for task in args.tasks:
    rows = []
    for name, directory, scale in players:
      print(
        f"arena: sampling {task} with {name} (CFG {scale:g}), {num_prompts} prompts", flush=True
      )
      if task == "t2i":
        pipe = QwenImagePipeline.from_pretrained(directory)
        images = evaluation.sample_t2i(pipe, t2i.prompts, _sampling(args, scale), args.seed)
        rows.append(rater.t2i(images, t2i))
      else:
        pipe = QwenImageEditPipeline.from_pretrained(directory)
        images = evaluation.sample_edits(
          pipe, edits.sources, edits.instructions, _sampling(args, scale), args.seed
        )
        rows.append(rater.edit(images, edits))
    categories = list(t2i.categories) if task == "t2i" else ["edit"] * num_prompts
    out[task] = (np.asarray(rows, np.float64), categories)
  return out


def rate(scored: dict, names, *, tie: float, rounds: int, seed: int) -> dict:
  """Per-category (and T2I overall) Elo with intervals, win rates and battle counts."""
  table = {}
  groups = []
  if "t2i" in scored:
    scores, cats = scored["t2i"]
    battles = pair_outcomes(scores, tie)
    groups.append(("t2i", battles))
    groups += [(c, [x for x in battles if cats[x[3]] == c]) for c in world.CATEGORIES]
  if "edit" in scored:
    groups.append(("edit", pair_outcomes(scored["edit"][0], tie)))
  for group, battles in groups:
    if not battles:
      continue  # a category without prompts, or a rater that scored no pair in it
    triples = [x[:3] for x in battles]
    fit = ratings.bootstrap_elo(triples, len(names), rounds=rounds, seed=seed)
    wins = ratings.win_rates(triples, len(names))
    table[group] = {
      "battles": len(battles),
      "players": {
        n: dict(
          elo=float(fit["elo"][i]),
          low=float(fit["low"][i]),
          high=float(fit["high"][i]),
          win_rate=float(wins[i]),
        )
        for i, n in enumerate(names)
      },
    }
  return table


def markdown(table: dict, names) -> str:
  head = "| category | battles | " + " | ".join(names) + " |"
  lines = [head, "|" + "---|" * (len(names) + 2)]
  for group, row in table.items():
    cells = [
      f"{p['elo']:.0f} [{p['low']:.0f}, {p['high']:.0f}]"
      for p in (row["players"][n] for n in names)
    ]
    lines.append(f"| {group} | {row['battles']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(table: dict, names, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = list(table)
  fig, axes = plt.subplots(
    1, len(groups), figsize=(2.6 * len(groups), 0.5 * len(names) + 1.6), sharey=True, squeeze=False
  )
  for ax, group in zip(axes[0], groups):
    rows = [table[group]["players"][n] for n in names]
    elo = np.array([r["elo"] for r in rows])
    err = np.array([[r["elo"] - r["low"] for r in rows], [r["high"] - r["elo"] for r in rows]])
    ax.errorbar(elo, np.arange(len(names)), xerr=err, fmt="o", capsize=3)
    ax.set_title(f"{group} ({table[group]['battles']})", fontsize=9)
    ax.axvline(ratings.ELO_CENTRE, color="0.8", lw=0.8)
    ax.tick_params(labelsize=8)
  axes[0][0].set_yticks(np.arange(len(names)), names)
  fig.supxlabel("Elo (95% bootstrap interval)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")  # a path or a binary file object
  plt.close(fig)


def parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m qwen_image_rl.arena", description=__doc__.split("\n")[0]
  )
  p.add_argument("--pipelines", nargs="+", required=True, metavar="NAME=DIR[@CFG]")
  p.add_argument("--rater", default="oracle", help="'oracle' or a judge directory (reward_sft)")
  p.add_argument("--judge_cot", type=int, default=1, choices=(0, 1), help="judge rater: CoT")
  p.add_argument("--split", default="val", choices=("val", "test"))
  p.add_argument("--battles", type=int, default=600, help="per task")
  p.add_argument("--tasks", default="t2i,edit")
  p.add_argument("--out", default="runs/arena")
  p.add_argument("--num_steps", type=int, default=20)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--tie", type=float, default=1e-3, help="score gap counted as a tie")
  p.add_argument("--bootstrap", type=int, default=200, help="bootstrap rounds")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.tasks = tuple(t for t in args.tasks.split(",") if t)
  args.judge_cot = bool(args.judge_cot)
  args.judge_dir = None if args.rater == "oracle" else judge_dir(args.rater)
  if not args.tasks or any(t not in TASKS for t in args.tasks):
    raise ArenaError(f"--tasks={','.join(args.tasks)!r}: choose from {TASKS}")
  if args.battles < 1:
    raise ArenaError(f"--battles={args.battles}: must be at least 1")
  return args


def run(argv) -> dict:
  args = parse_args(argv)
  players = [parse_player(t) for t in args.pipelines]
  names = [p[0] for p in players]
  if len(set(names)) != len(names) or len(names) < 2:
    raise ArenaError(f"--pipelines: need at least two players with distinct names, got {names}")
  num_prompts = math.ceil(args.battles / math.comb(len(names), 2))
  scored = score_players(players, args, num_prompts)
  table = rate(scored, names, tie=args.tie, rounds=args.bootstrap, seed=args.seed)
  if not table:
    raise ArenaError(f"--rater={args.rater!r} scored no image validly: no battle to rate")
  paths.makedirs(args.out)  # local or gs://
  result = dict(
    rater=args.rater if args.judge_dir is None else args.judge_dir,
    judge_cot=args.judge_cot if args.judge_dir else None,
    split=args.split,
    prompts_per_task=num_prompts,
    players={n: dict(directory=d, cfg_scale=s) for n, d, s in players},
    mean_score={t: dict(zip(names, map(float, np.nanmean(scored[t][0], axis=1)))) for t in scored},
    invalid={t: dict(zip(names, map(int, np.isnan(scored[t][0]).sum(axis=1)))) for t in scored},
    ratings=table,
  )
  paths.write_json_atomic(paths.join(args.out, "arena.json"), result, indent=2)
  text = markdown(table, names)
  paths.write_text_atomic(paths.join(args.out, "arena.md"), text + "\n")
  with paths.open_file(paths.join(args.out, "arena.png"), "wb") as f:
    plot(table, names, f)
  print(text)
  return result


def main(argv=None):
  host_memory.tune_malloc()  # before any jitted sampling allocates (see host_memory.py)
  try:
    run(sys.argv[1:] if argv is None else argv)
  except ArenaError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
