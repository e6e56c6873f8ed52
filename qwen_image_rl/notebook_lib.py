"""What the notebooks (notebooks/*.ipynb) share: the SHORT switch, a base pipeline, micro configs.

The notebooks call the package's own entry points (runner.run on configs/, evaluation,
judge_eval, rl_curves, grpo_ablation, demo); this module holds only what several of them need
around those:

  short_mode()             QWEN_IMAGE_RL_NOTEBOOK_SHORT=1 (CI) selects the micro form
  run_dir(name)            where a notebook writes its runs
  random_pipeline(dir)     an untrained pipeline on disk, built in Flax (no torch), in seconds
  micro_base(dir)          the short form's base: a random micro pipeline, shared by notebooks
  base_pipeline(dir)       the short form's micro base, or (full form) the demo's base export,
                           trained first by the demo's vae and base stages if missing
  shrink(config)           a trainer config cut to micro size (the short form)
  show_images(rows)        labelled rows of images, inline
  markdown_table(rows)     a list of dicts as a markdown table
  report(results)          prints the notebook's results as one JSON line (CI reads it)

Short-form numbers come from untrained or barely trained micro models: they exercise every code
path end to end and mean nothing. The full form uses the real tiny configs or the demo's exports.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np

SHORT_ENV = "QWEN_IMAGE_RL_NOTEBOOK_SHORT"
WORKDIR_ENV = "QWEN_IMAGE_RL_NOTEBOOK_WORKDIR"
RESULTS_MARKER = "NOTEBOOK_RESULTS "

# The short form's micro model: one DiT block, a one-layer text encoder, a VAE that downsamples
# 4x, 32 px images (8x8 latents, 16 image tokens).
MICRO_IMAGE_SIZE = 32
MICRO_TRANSFORMER = dict(
  patch_size=2, num_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6)
)
MICRO_TEXT_ENCODER = dict(
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=1,
  num_attention_heads=2,
  num_key_value_heads=1,
  rope_theta=1e6,
  mrope_section=(2, 3, 3),
)
# configs/vae.py:tiny's VAE with these changes: half the width, 4 latent channels.
MICRO_VAE_CHANGES = dict(base_dim=8, z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
# The micro RL run: 2 prompts x 4 rollouts, 4 denoising steps (2 trained), a held-out eval of 8
# prompts / 4 edits at 4 steps. One batch size everywhere so that the samplers compile once.
MICRO_RL = {
  "image_size": MICRO_IMAGE_SIZE,
  "num_prompts": 16,
  "group_size": 4,
  "prompts_per_step": 2,
  "rollout_chunks": 1,
  "num_steps": 4,
  "num_train": 2,
  "first_m": 3,
  "fm_draws": 2,
  "num_t2i": 8,
  "num_edits": 4,
  "eval_steps": 4,
  "opd_batch": 4,
}
# The micro judge (reward_sft): a one-layer Qwen2.5-VL, 8-pixel patches merged 2x2, and a
# 4-token chain of thought.
MICRO_JUDGE_MODEL = dict(
  text=dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_theta=1e4,
    mrope_section=(2, 2, 4),
  ),
  vision=dict(
    depth=1,
    hidden_size=32,
    intermediate_size=32,
    num_heads=2,
    patch_size=8,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=64,
    fullatt_block_indexes=(0,),
  ),
)
MICRO_JUDGE_DATA = dict(
  n_specs=8, n_edits=4, t2i_batch_size=4, edit_batch_size=2, caption_batch_size=2
)
MICRO_PERCEPTION = dict(steps=2, batch_size=4, n_images=8)
MICRO_JUDGE_COT_TOKENS = 4


def short_mode() -> bool:
  """True when the environment asks for the short (CI) form: QWEN_IMAGE_RL_NOTEBOOK_SHORT=1."""
  value = os.environ.get(SHORT_ENV, "0").strip().lower()
  if value not in ("", "0", "1", "false", "true", "no", "yes"):
    raise ValueError(f"{SHORT_ENV}={value!r}: expected 1 (short form) or 0 (full form)")
  return value in ("1", "true", "yes")


def repo_root() -> str:
  """The checkout holding configs/ (a notebook runs from notebooks/ or from the root)."""
  here = os.path.abspath(os.getcwd())
  for candidate in (here, os.path.dirname(here)):
    if os.path.isfile(os.path.join(candidate, "configs", "common.py")):
      return candidate
  raise FileNotFoundError(
    f"no configs/common.py in {here} or its parent: start the notebook in the repository's "
    "notebooks/ directory or its root"
  )


def run_dir(name: str, short: bool) -> str:
  """$QWEN_IMAGE_RL_NOTEBOOK_WORKDIR/<name> if set; else a fresh temporary directory (short
  form) or runs/notebooks/<name> in the checkout (full form, kept so a rerun resumes)."""
  if os.environ.get(WORKDIR_ENV):
    path = os.path.join(os.environ[WORKDIR_ENV], name)
  elif short:
    path = tempfile.mkdtemp(prefix=f"qwen_image_rl_{name}_")
  else:
    path = os.path.join(repo_root(), "runs", "notebooks", name)
  os.makedirs(path, exist_ok=True)
  return path


# ---------------------------------------------------------------------------------------------
# Pipelines.
# ---------------------------------------------------------------------------------------------


def random_params(abstract, seed: int):
  """numpy parameters for a tree of ShapeDtypeStructs: kernels N(0, 1/fan_in), embeddings
  N(0, 1), biases 0, norm scales 1. Instead of flax's init, whose compile takes minutes for the
  VAE's 3-D convolutions on XLA:CPU."""
  import jax

  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      std = 1.0 / math.sqrt(max(1, math.prod(x.shape[:-1])))
      return (rng.standard_normal(x.shape) * std).astype(x.dtype)
    if name == "embedding":
      return rng.standard_normal(x.shape).astype(x.dtype)
    if name == "bias":
      return np.zeros(x.shape, x.dtype)
    return np.ones(x.shape, x.dtype)  # scale / weight / gamma of the norms

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def random_pipeline(
  directory: str, *, transformer=None, text_encoder=None, vae=None, seed: int = 0
) -> str:
  """An untrained pipeline saved in diffusers format at `directory/pipeline` (the micro sizes by
  default), with the tiny world's tokenizer; no torch needed. Reused when already there; built
  in a scratch directory and renamed into place, so processes racing to build it are safe.
  Returns the pipeline directory."""
  path = os.path.join(directory, "pipeline")
  if os.path.isfile(os.path.join(path, "model_index.json")):
    return path
  import shutil

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from configs import sft
  from configs import vae as vae_config
  from qwen_image_rl.models.mmdit import QwenImageTransformer
  from qwen_image_rl.models.qwen2_5_vl import Qwen25VLTextModel
  from qwen_image_rl.models.vae import QwenImageVAE, abstract_variables
  from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
  from qwen_image_rl.trainers.sft import build_tokenizer

  os.makedirs(directory, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=".building_", dir=directory)
  tokenizer = build_tokenizer(os.path.join(scratch, "tokenizer"))
  te_model = Qwen25VLTextModel(
    vocab_size=len(tokenizer), **dict(text_encoder or MICRO_TEXT_ENCODER)
  )
  ids = jnp.zeros((1, 4), jnp.int32)
  te_abstract = jax.eval_shape(te_model.init, jax.random.key(0), ids, ids + 1)["params"]
  te_params = random_params(nn.meta.unbox(te_abstract), seed)
  if vae is None:
    vae = dict(vae_config.get_config("tiny").model.vae.to_dict(), **MICRO_VAE_CHANGES)
  vae_model = QwenImageVAE.from_config(dict(vae))
  vae_params = random_params(nn.meta.unbox(abstract_variables(vae_model)), seed + 1)
  fields = dict(transformer or MICRO_TRANSFORMER)
  fields.update(
    in_channels=4 * vae_model.z_dim,
    out_channels=vae_model.z_dim,
    joint_attention_dim=te_model.hidden_size,
  )
  model = QwenImageTransformer.from_config(fields)
  params = random_params(nn.meta.unbox(model.abstract_params()), seed + 2)
  scheduler = dict(sft.get_config("tiny").model.scheduler)
  pipe = QwenImagePipeline(
    model, params, vae_model, vae_params, te_model, te_params, tokenizer, scheduler
  )
  pipe.save_pretrained(os.path.join(scratch, "pipeline"))
  try:
    os.rename(os.path.join(scratch, "pipeline"), path)
  except OSError:  # another process finished first: keep its copy
    if not os.path.isfile(os.path.join(path, "model_index.json")):
      raise
  shutil.rmtree(scratch, ignore_errors=True)
  return path


def micro_base(directory: str) -> str:
  """The short form's base: a random micro pipeline, built once under
  $QWEN_IMAGE_RL_NOTEBOOK_WORKDIR/micro_base when that is set (CI: one for all notebooks),
  else under `directory`."""
  root = os.environ.get(WORKDIR_ENV) or directory
  return random_pipeline(os.path.join(root, "micro_base"))


def demo_export(stage: str) -> str | None:
  """runs/demo/<stage>/export/pipeline of `make demo` in this checkout, or None."""
  path = os.path.join(repo_root(), "runs", "demo", stage, "export", "pipeline")
  return path if os.path.isfile(os.path.join(path, "model_index.json")) else None


def base_pipeline(directory: str, short: bool) -> str:
  """The base every notebook starts from. Short form: `micro_base(directory)`. Full form: the
  demo's base export, trained first by the demo's own vae and base stages (`python -m
  qwen_image_rl.demo --stages=vae,base`, about 15 minutes on a 2-core CPU) when runs/demo has
  none."""
  if short:
    return micro_base(directory)
  found = demo_export("base")
  if found:
    return found
  from qwen_image_rl import demo

  workdir = os.path.join(repo_root(), "runs", "demo")
  for name, config in demo.stages(workdir)[:2]:  # vae, base
    demo.run_stage(name, config, workdir)
  return demo_export("base")


# ---------------------------------------------------------------------------------------------
# Micro configs.
# ---------------------------------------------------------------------------------------------


def _shrink_rl(rl, data) -> None:
  m = MICRO_RL
  data.update(dict(image_size=m["image_size"], num_prompts=m["num_prompts"]))
  rl.update(
    dict(
      group_size=m["group_size"],
      prompts_per_step=m["prompts_per_step"],
      rollout_chunks=m["rollout_chunks"],
      num_steps=m["num_steps"],
      fm_draws=m["fm_draws"],
    )
  )
  if rl.timesteps.strategy == "all":
    rl.timesteps.update(dict(num_train=m["num_steps"], first_m=m["num_steps"]))
  else:
    rl.timesteps.update(dict(num_train=m["num_train"], first_m=m["first_m"]))


def eval_config(short: bool):
  """The held-out evaluation settings (configs/common.py tiny_eval: 128 prompts and 64 edits at
  64 px, 20 steps); the short form's: 8 prompts and 4 edits at 32 px, 4 steps."""
  from configs import common

  cfg = common.tiny_eval()
  if short:
    m = MICRO_RL
    cfg.update(
      dict(
        num_t2i=m["num_t2i"],
        num_edits=m["num_edits"],
        image_size=m["image_size"],
        num_steps=m["eval_steps"],
        batch_size=m["group_size"] * m["prompts_per_step"],
      )
    )
  return cfg


def shrink(config):
  """`config` (grpo / nft / awm, curate, rl_mix, opd, reward_sft) at micro size, in place: micro
  models and batches, 4 denoising steps, a held-out eval of at most 8 prompts / 4 edits (a task
  the config does not evaluate stays off), synchronous checkpoints only at the end, no images."""
  m = MICRO_RL
  if config.trainer == "reward_sft":
    config.model.update(MICRO_JUDGE_MODEL)
    config.data.update(MICRO_JUDGE_DATA)
    config.judge.max_cot_tokens = MICRO_JUDGE_COT_TOKENS
    config.perception.update(MICRO_PERCEPTION)
  if "rl" in config:
    _shrink_rl(config.rl, config.data)
  if "tasks" in config:  # rl_mix: each task's own rl / data sections
    for task in config.tasks.values():
      _shrink_rl(task.rl, task.data)
  if config.trainer == "curate":  # an untrained micro model's ranges sit below any real threshold
    config.rl.curation.threshold = 0.0
  if "opd" in config:
    config.data.update(dict(image_size=m["image_size"], num_prompts=m["num_prompts"]))
    opd = config.opd
    if opd.num_train_steps > 0:  # the same share of the fewer steps (at least one)
      share = opd.num_train_steps / opd.num_steps
      opd.num_train_steps = min(m["num_steps"], max(1, round(share * m["num_steps"])))
    opd.update(dict(batch_size=m["opd_batch"], num_steps=m["num_steps"]))
  if "eval" in config and "num_t2i" in config.eval:
    micro = eval_config(short=True)
    micro.update(
      dict(
        num_t2i=min(config.eval.num_t2i, micro.num_t2i),
        num_edits=min(config.eval.num_edits, micro.num_edits),
      )
    )
    sizes = ("num_t2i", "num_edits", "image_size", "num_steps", "batch_size")
    config.eval.update({k: micro[k] for k in sizes})
  config.checkpoint.update(dict(async_save=False, every=max(1, config.total_steps)))
  config.log.update(dict(every=1, images_every=0))
  return config


def micro_overrides(config) -> dict:
  """What `shrink` changes in `config`, as flattened key -> value overrides (the form of
  rl_curves' --set); `config` itself is left as it is."""
  from qwen_image_rl import config_lib

  before = config_lib.flatten(config)
  after = config_lib.flatten(shrink(config.copy_and_resolve_references()))
  return {k: v for k, v in after.items() if before.get(k) != v}


# ---------------------------------------------------------------------------------------------
# Display and results.
# ---------------------------------------------------------------------------------------------


def show_images(rows: dict, *, scale: float = 1.0, title: str = "") -> None:
  """One row of images per entry {label: uint8 [N, H, W, 3]}, drawn inline."""
  import matplotlib.pyplot as plt

  from qwen_image_rl import metrics

  labels, grids = list(rows), [np.asarray(v) for v in rows.values()]
  n = max(len(g) for g in grids)
  fig, axes = plt.subplots(
    len(grids), 1, figsize=(scale * 1.1 * n, scale * 1.25 * len(grids)), squeeze=False
  )
  for ax, label, images in zip(axes[:, 0], labels, grids):
    ax.imshow(metrics.image_grid(images, len(images), pad=2, pad_value=255))
    ax.set_title(label, fontsize=9, loc="left")
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  plt.show()


def markdown_table(rows, columns=None, digits: int = 3) -> str:
  """A list of dicts as a markdown table (floats to `digits` places, missing cells empty)."""
  columns = list(columns or dict.fromkeys(k for r in rows for k in r))

  def cell(v):
    if isinstance(v, float):
      return f"{v:.{digits}f}"
    return "" if v is None else str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def report(results: dict) -> None:
  """Prints `results` as one JSON line after RESULTS_MARKER (what CI reads)."""
  print(RESULTS_MARKER + json.dumps(results, sort_keys=True, default=float), flush=True)


def parse_report(text: str) -> dict:
  """The results a notebook printed with `report` (the last such line in `text`)."""
  lines = [line for line in text.splitlines() if line.startswith(RESULTS_MARKER)]
  if not lines:
    raise ValueError(f"no line starting with {RESULTS_MARKER!r} in the notebook's output")
  return json.loads(lines[-1][len(RESULTS_MARKER) :])
