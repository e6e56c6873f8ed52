"""`make demo`: the paper's pipeline in miniature, each stage in WORKDIR/<stage>/.

  python -m qwen_image_rl.demo --workdir=runs/demo [--rl_mix] [--stages=opd]
      [--summary_t2i=512 --summary_edits=256]

  vae          configs/vae.py:tiny      the tiny VAE                     -> vae/export/vae
  base         configs/sft.py:tiny      flow-matching pretraining        -> base/export/pipeline
  rl_t2i       RL_T2I_CONFIG, shorter   the T2I teacher (DiffusionNFT)   -> rl_t2i/export/pipeline
  curate_edit  CURATE_EDIT_CONFIG       edits whose rollouts differ      -> curate_edit/*.jsonl
  rl_edit      RL_EDIT_CONFIG, shorter  the edit teacher, on those edits -> rl_edit/export/pipeline
  rl_mix       (--rl_mix)               the Mix-RL baseline              -> rl_mix/export/pipeline
  opd          configs/opd.py:tiny, 200 CFG-free student of both         -> opd/export/pipeline

A stage whose final checkpoint and export exist is skipped; an interrupted one resumes from its
last checkpoint (curate_edit keeps none: it is done once its prompt file, written atomically,
exists, and starts again if interrupted). The RL and OPD stages run DEMO_ITERATIONS instead of
their standalone budgets (the student trains DEMO_OPD_TRAIN_STEPS of its 10 states), and they
and the base evaluate nothing themselves: at the end `summary` scores every export on
the same held-out sets (base at CFG 4, 2.5 and 1, teachers and Mix-RL at CFG 4, the student at
CFG 1), measures each sampler's images/s, prints a table and the paired differences the targets
are read from (COMPARISONS: a - b with its standard error on the same prompts and noise), and
writes both to WORKDIR/summary.json.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS

# The RL stages' configs: the objective measured best per task from the demo base (README, "RL
# objectives"): nft on T2I (100-iteration curves: +0.044 / +0.034 at 50 / 100 iterations, where
# GRPO's policy loses general scenes: -0.005 / -0.008), nft on edit
# (+0.038 vs +0.006 in 10-iteration runs).
RL_T2I_CONFIG = ("rl_t2i", "tiny")
RL_EDIT_CONFIG = ("rl_edit", "tiny")
RL_MIX_CONFIG = ("rl_mix", "tiny")
# Prompt curation by intra-group reward range (paper sec. 4) for the edit teacher: on 256 edits,
# curated teachers read +0.008 +- 0.010 instruction following over uncurated ones on both of two
# seeds (README, "Edit prompt curation"). The edit rollouts' own sampler (rl.num_steps = 10
# steps with CFG) scores the groups, at half the cost of configs/curate.py's 20.
CURATE_EDIT_CONFIG = ("curate", "edit")
# Iterations per stage in the demo (standalone: rl_t2i 60, rl_edit 40), sized for the
# 45-minute budget on a 2-core CPU (the whole demo: 40.3 min from scratch, README "Quick start").
DEMO_ITERATIONS = {"rl_t2i": 60, "rl_edit": 40, "opd": 200}  # rl_mix: rl_t2i + rl_edit
# The student's share of T2I iterations (configs/opd.py: 0.5). The 150-iteration, 50% student
# of 2026-12-04 trailed the edit teacher more than the T2I one; 200 at 0.4 (80 T2I, 120 edit)
# moved edit IF +0.006 +- 0.005 and T2I -0.004 +- 0.004 on 512 prompts / 256 edits (README,
# "The whole demo chain").
DEMO_OPD_T2I_FRACTION = 0.4
# States trained per student iteration, of the 10 it samples (configs/opd.py: all): the
# documented cost deviation, an unbiased estimate of the all-steps loss. 7 of 10 cuts an edit
# iteration from 4.8-5.1 s to 2.7-2.9 s on this CPU and moved the student by 0.002 or less on
# both tasks (README "On-policy distillation"); it is what brings the demo inside 45 minutes.
DEMO_OPD_TRAIN_STEPS = 7
# 12 flow-matching draws per rollout instead of the standalone configs' 4: in rl_curves the
# first setting that moved both tasks' held-out scores above their base and their placebo
# (README, "fm_draws"; within one eval's noise), at 1.5x (T2I) to 2x (edit) the iteration time.
DEMO_FM_DRAWS = 12
# Stage times of `make demo` from scratch on the 2-core CPU (seconds; 2026-12-05 evening, README
# "Quick start"; rl_mix from an earlier WORKDIR's run), for the ETA before a stage has run.
ESTIMATED_SECONDS = {
  "vae": 315,
  "base": 565,
  "rl_t2i": 300,
  "curate_edit": 220,
  "rl_edit": 340,
  "rl_mix": 340,
  "opd": 395,
  "summary": 95,
}
# Eval batches whose median gives a row's images/s (one batch read 1.7-2.5x for the same two
# samplers in different summaries on this CPU).
TIMED_BATCHES = 3
# Paired differences the OPD issue's targets and the paper's claims are read from: (row a, row b,
# task), reported as a - b with its standard error on the same prompts and noise.
COMPARISONS = (
  ("student_cfg1", "teacher_t2i_cfg4", "t2i"),
  ("student_cfg1", "teacher_edit_cfg4", "edit"),
  ("student_cfg1", "base_cfg4", "t2i"),
  ("student_cfg1", "base_cfg4", "edit"),
  ("teacher_t2i_cfg4", "base_cfg4", "t2i"),
  ("teacher_edit_cfg4", "base_cfg4", "edit"),
  ("student_cfg1", "mix_rl_cfg4", "t2i"),
  ("student_cfg1", "mix_rl_cfg4", "edit"),
  ("base_cfg2.5", "base_cfg4", "t2i"),
  ("base_cfg2.5", "base_cfg4", "edit"),
)
SUMMARY_ROWS = (  # (label, stage, CFG scale)
  ("base_cfg4", "base", 4.0),
  ("base_cfg2.5", "base", 2.5),  # the base's own eval CFG (configs/sft.py)
  ("base_cfg1", "base", 1.0),
  ("teacher_t2i_cfg4", "rl_t2i", 4.0),
  ("teacher_edit_cfg4", "rl_edit", 4.0),
  ("mix_rl_cfg4", "rl_mix", 4.0),
  ("student_cfg1", "opd", 1.0),
)


def _define_flags():
  # Defined only when run as a program: `qwen_image_rl.main` owns --workdir in other processes.
  flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its run.")
  flags.DEFINE_list("stages", None, "Run only these stages (default: all).")
  flags.DEFINE_bool("rl_mix", False, "Also run the Mix-RL baseline stage (rl_mix).")
  flags.DEFINE_integer(
    "summary_t2i", None, "Held-out T2I prompts the summary scores (default: tiny_eval's 128)."
  )
  flags.DEFINE_integer(
    "summary_edits",
    None,
    "Held-out edits the summary scores (default: tiny_eval's 64; 256 resolves a 0.01 edit "
    "difference about twice as well, at about a minute more per row here).",
  )


def summary_eval_config(num_t2i: int | None = None, num_edits: int | None = None):
  """configs/common.py tiny_eval with the summary's prompt and edit counts where given."""
  from configs import common

  for flag, value in (("summary_t2i", num_t2i), ("summary_edits", num_edits)):
    if value is not None and value < 1:
      raise ValueError(f"--{flag}={value}: must be >= 1")
  return common.tiny_eval(num_t2i, num_edits)


def _config(module: str, variant: str):
  # `configs` is the repo's config directory: run from the repo root, as `main` is.
  return importlib.import_module(f"configs.{module}").get_config(variant)


def _export(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "export", "pipeline")


def _rl_stage(config_name, workdir: str, stage: str):
  c = _config(*config_name)
  c.init_from = _export(workdir, "base")
  c.total_steps = DEMO_ITERATIONS.get(stage, c.total_steps)  # rl_mix: set by `stages`
  c.eval.update(dict(num_t2i=0, num_edits=0, at_start=False))  # the summary evaluates
  return c


def _teacher_stage(config_name, workdir: str, stage: str):
  c = _rl_stage(config_name, workdir, stage)
  c.rl.fm_draws = DEMO_FM_DRAWS
  return c


def _curate_stage(workdir: str, rl_edit):
  c = _config(*CURATE_EDIT_CONFIG)
  c.init_from = _export(workdir, "base")
  c.rl.num_steps = rl_edit.rl.num_steps  # rank groups under the sampler the rollouts use
  return c


def curated_edits(workdir: str, curate) -> str:
  return os.path.join(workdir, "curate_edit", curate.rl.curation.output)


def stages(workdir: str, rl_mix: bool = False):
  """(name, config) for every stage, with the links between them filled in."""
  vae = _config("vae", "tiny")
  base = _config("sft", "tiny")
  base.model.vae_from = os.path.join(workdir, "vae", "export", "vae")
  base.eval.update(dict(num_t2i=0, num_edits=0))  # the summary's base rows are this eval
  rl_edit = _teacher_stage(RL_EDIT_CONFIG, workdir, "rl_edit")
  curate = _curate_stage(workdir, rl_edit)
  rl_edit.data.prompt_file = curated_edits(workdir, curate)
  out = [
    ("vae", vae),
    ("base", base),
    ("rl_t2i", _teacher_stage(RL_T2I_CONFIG, workdir, "rl_t2i")),
    ("curate_edit", curate),
    ("rl_edit", rl_edit),
  ]
  if rl_mix:
    mix = _rl_stage(RL_MIX_CONFIG, workdir, "rl_mix")
    # The teachers' rollout budget together, T2I on the T2I teacher's share of it, edits from
    # the same curated set as the edit teacher's.
    mix.total_steps = DEMO_ITERATIONS["rl_t2i"] + DEMO_ITERATIONS["rl_edit"]
    mix.mix.t2i_fraction = DEMO_ITERATIONS["rl_t2i"] / mix.total_steps
    mix.tasks.edit.data.prompt_file = rl_edit.data.prompt_file
    out.append(("rl_mix", mix))
  opd = _config("opd", "tiny")
  opd.init_from = _export(workdir, "base")
  opd.teachers.t2i = _export(workdir, "rl_t2i")
  opd.teachers.edit = _export(workdir, "rl_edit")
  opd.total_steps = DEMO_ITERATIONS["opd"]
  opd.opd.t2i_fraction = DEMO_OPD_T2I_FRACTION
  opd.opd.num_train_steps = DEMO_OPD_TRAIN_STEPS
  opd.eval.update(dict(num_t2i=0, num_edits=0, at_start=False))
  out.append(("opd", opd))
  return out


def stage_done(workdir: str, name: str, config) -> bool:
  """The final checkpoint and the export are both there (curate_edit: its prompt file)."""
  from qwen_image_rl.trainers.common import final_checkpoint_exists

  stage_dir = os.path.join(workdir, name)
  if name == "curate_edit":
    return os.path.isfile(curated_edits(workdir, config))
  export = (
    os.path.join(stage_dir, "export", "vae", "config.json")
    if name == "vae"
    else os.path.join(stage_dir, "export", "pipeline", "model_index.json")
  )
  return final_checkpoint_exists(stage_dir, config.total_steps) and os.path.isfile(export)


# Keys added to the stage configs after WORKDIRs were made, with the value that does what a run
# without them did: a record that lacks them ran with that value.
ADDED_LATER = {
  "loss.time_shift_scale": 1.0,
  "model.transformer_overrides.init_scheme": "torch",
  "data.t2i_categories": ["general", "typography", "portrait", "landscape"],
}


# Config sections that change how a run is logged, saved and evaluated, not what it trains: an
# unfinished stage resumes across changes to them.
BOOKKEEPING = ("checkpoint.", "log.", "profile.", "eval.")


def changed_settings(stage_dir: str, config) -> list[str]:
  """Config keys whose value in STAGE_DIR/config.json (what the stage ran with) differs from
  `config`; [] when there is no record."""
  from qwen_image_rl import config_lib

  recorded = os.path.join(stage_dir, "config.json")
  if not os.path.isfile(recorded):
    return []
  with open(recorded) as f:
    before = config_lib.flatten(json.load(f))
  now = config_lib.flatten(json.loads(config_lib.to_json(config)))
  before = {k: v for k, v in ADDED_LATER.items() if k in now} | before
  return sorted(k for k in before.keys() | now.keys() if not _same(before.get(k), now.get(k)))


def _same(recorded, now) -> bool:
  """Equal settings; a path also equals itself spelt otherwise (runs/demo vs /abs/runs/demo:
  both are read from the repository root, where the demo runs)."""
  if recorded == now:
    return True
  paths = isinstance(recorded, str) and isinstance(now, str) and os.sep in recorded + now
  return paths and os.path.realpath(recorded) == os.path.realpath(now)


def run_stage(name: str, config, workdir: str) -> bool:
  """Runs (or resumes) a stage; False if it was already done. An unfinished stage recorded
  with other settings is a ConfigError, not resumed."""
  from qwen_image_rl import config_lib, runner

  stage_dir = os.path.join(workdir, name)
  changed = [k for k in changed_settings(stage_dir, config) if not k.startswith(BOOKKEEPING)]
  if stage_done(workdir, name, config):
    print(f"== {name}: finished earlier in {stage_dir}, skipping", flush=True)
    if changed:  # e.g. a WORKDIR from an older demo: its stage is kept, not silently redone
      print(
        f"   warning: {name} ran with other settings than the demo's now ({', '.join(changed)}); "
        f"delete {stage_dir} to run it again",
        flush=True,
      )
    return False
  if changed:  # an unfinished stage of an older demo would resume under settings it never had
    raise config_lib.ConfigError(
      f"{name}: {stage_dir} holds an unfinished run with other settings than the demo's now "
      f"({', '.join(changed)}); resuming would mix the two. Delete {stage_dir} to run the stage "
      "again, or use another --workdir"
    )
  print(f"== {name}: {config.trainer} -> {stage_dir}", flush=True)
  start = time.time()
  runner.run(config, stage_dir)
  print(f"== {name}: done in {time.time() - start:.0f} s", flush=True)
  return True


class Progress:
  """Stage k of n and the demo's ETA: estimates scaled by how fast the stages so far ran."""

  def __init__(self, names):
    self.names = list(names)
    self.start = time.time()
    self.measured = {}  # stage -> seconds, for stages that ran in this process

  def ratio(self) -> float:
    if not self.measured:
      return 1.0
    return sum(self.measured.values()) / sum(ESTIMATED_SECONDS.get(n, 300) for n in self.measured)

  def eta_seconds(self, remaining) -> float:
    return self.ratio() * sum(ESTIMATED_SECONDS.get(n, 300) for n in remaining)

  def report(self, k: int) -> str:
    name = self.names[k]
    eta = self.eta_seconds(self.names[k:])
    return (
      f"[demo {k + 1}/{len(self.names)}] {name}; elapsed "
      f"{(time.time() - self.start) / 60:.1f} min, ETA {eta / 60:.1f} min"
    )


# ------------------------------------------------------------------------------------------
# Summary: every export on the same held-out sets
# ------------------------------------------------------------------------------------------


def images_per_second(pipe, eval_cfg, seed: int, repeats: int = TIMED_BATCHES) -> float:
  """T2I sampler throughput at eval_cfg's CFG scale: the median over `repeats` timed eval
  batches after a warm-up call (CFG > 1 runs two transformer passes per step, CFG 1 one)."""
  from qwen_image_rl import evaluation
  from qwen_image_rl.data import examples

  n = eval_cfg.batch_size
  prompts = examples.t2i_examples(seed, n, eval_cfg.split, eval_cfg.image_size).prompts
  evaluation.sample_t2i(pipe, prompts, eval_cfg, seed)  # compiled (usually already)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    evaluation.sample_t2i(pipe, prompts, eval_cfg, seed)
    rates.append(n / (time.perf_counter() - start))
  return statistics.median(rates)


def evaluate_row(workdir: str, label: str, stage: str, cfg_scale: float, eval_cfg, seed: int):
  """The row's eval results, or None if the stage has no export. Cached in
  WORKDIR/summary/<label>.json, reused while it is newer than the export and was made with the
  same eval settings, seed and number of timed batches."""
  from qwen_image_rl import evaluation
  from qwen_image_rl.rl.policy import load_exported

  directory = _export(workdir, stage)
  if not os.path.isfile(os.path.join(directory, "model_index.json")):
    return None
  cfg = eval_cfg.copy_and_resolve_references()
  cfg.cfg_scale = cfg_scale
  settings = {"eval": cfg.to_dict(), "seed": seed, "timed_batches": TIMED_BATCHES}
  cache = os.path.join(workdir, "summary", f"{label}.json")
  if os.path.isfile(cache) and os.path.getmtime(cache) > os.path.getmtime(
    os.path.join(directory, "model_index.json")
  ):
    with open(cache) as f:
      cached = json.load(f)
    if cached.get("settings") == json.loads(json.dumps(settings)):
      return cached
  t2i, edit = load_exported(directory, f"the {stage} stage's export")
  results = evaluation.evaluate(t2i, edit, cfg, step=0, seed=seed)
  results.update(
    stage=stage,
    cfg_scale=cfg_scale,
    images_per_second=images_per_second(t2i, cfg, seed),
    settings=settings,
  )
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  with open(cache, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  return results


COLUMNS = (  # (header, path in the eval results)
  ("T2I capped", ("t2i", "overall")),
  ("T2I soft", ("t2i", "overall_mean")),
  ("T2I strict", ("t2i", "strict")),
  ("general", ("t2i", "by_category", "general")),
  ("typogr.", ("t2i", "by_category", "typography")),
  ("portrait", ("t2i", "by_category", "portrait")),
  ("landsc.", ("t2i", "by_category", "landscape")),
  ("edit IF", ("edit", "instruction_following")),
  ("preserv.", ("edit", "preservation")),
  ("identity", ("edit", "identity")),
  ("img/s", ("images_per_second",)),
)


def _get(results, path):
  for key in path:
    if not isinstance(results, dict) or key not in results:
      return None
    results = results[key]
  return results


def format_summary(rows: dict) -> str:
  """A markdown table: one row per (stage, CFG), the COLUMNS as columns."""
  lines = ["| run | " + " | ".join(h for h, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
  for label, results in rows.items():
    cells = []
    for _, path in COLUMNS:
      v = _get(results, path)
      cells.append(
        "-" if v is None else f"{v:.3f}" if path[0] != "images_per_second" else f"{v:.1f}"
      )
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def comparisons(rows: dict) -> list[dict]:
  """COMPARISONS whose two rows are both there: a - b on T2I capped overall (category-weighted)
  or edit instruction following, with the paired standard error (evaluation.paired_difference)."""
  from qwen_image_rl import evaluation

  out = []
  for a, b, task in COMPARISONS:
    if a in rows and b in rows:
      found = evaluation.paired_differences(rows[a], rows[b])
      if task in found:
        diff, se = found[task]
        out.append(dict(a=a, b=b, task=task, difference=diff, standard_error=se))
  return out


def format_comparisons(found: list[dict]) -> str:
  lines = ["| a - b | on | difference | paired SE |", "|---|---|---|---|"]
  on = {"t2i": "T2I capped", "edit": "edit IF"}
  for c in found:
    lines.append(
      f"| {c['a']} - {c['b']} | {on[c['task']]} | {c['difference']:+.3f} | "
      f"{c['standard_error']:.3f} |"
    )
  return "\n".join(lines)


def summary(workdir: str, seed: int = 0, eval_cfg=None) -> str:
  """Scores every stage's export (SUMMARY_ROWS) on `eval_cfg`'s held-out sets (default
  configs/common.py tiny_eval), writes WORKDIR/summary.json, returns the table and the paired
  differences."""
  from configs import common

  eval_cfg = common.tiny_eval() if eval_cfg is None else eval_cfg
  rows = {}
  for label, stage, cfg_scale in SUMMARY_ROWS:
    results = evaluate_row(workdir, label, stage, cfg_scale, eval_cfg, seed)
    if results is not None:
      rows[label] = results
  found = comparisons(rows)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(
      {"eval": eval_cfg.to_dict(), "rows": rows, "comparisons": found}, f, indent=1, sort_keys=True
    )
  table = format_summary(rows)
  return table + "\n\n" + format_comparisons(found) if found else table


def main(argv):
  del argv
  workdir = FLAGS.workdir
  selected = FLAGS.stages
  all_stages = stages(workdir, rl_mix=FLAGS.rl_mix)
  unknown = set(selected or ()) - {n for n, _ in all_stages}
  if unknown:
    print(
      f"error: unknown stages {sorted(unknown)}; known: {[n for n, _ in all_stages]}",
      file=sys.stderr,
    )
    sys.exit(2)
  try:  # checked before any stage runs, not after them
    eval_cfg = summary_eval_config(FLAGS.summary_t2i, FLAGS.summary_edits)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  todo = [(n, c) for n, c in all_stages if selected is None or n in selected]
  progress = Progress([n for n, _ in todo] + ["summary"])
  for k, (name, config) in enumerate(todo):
    print(progress.report(k), flush=True)
    start = time.time()
    if run_stage(name, config, workdir):
      progress.measured[name] = time.time() - start
  print(progress.report(len(todo)), flush=True)
  table = summary(workdir, eval_cfg=eval_cfg)
  print(
    f"== demo finished in {time.time() - progress.start:.0f} s; "
    f"{os.path.join(workdir, 'summary.json')}\n{table}",
    flush=True,
  )


if __name__ == "__main__":
  from qwen_image_rl import host_memory

  host_memory.tune_malloc()
  _define_flags()
  app.run(main)
