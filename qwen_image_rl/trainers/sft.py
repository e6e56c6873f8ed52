"""`sft` trainer: flow-matching pretraining of the tiny Qwen-Image base on T2I and edit data.

The same modules as the 20B model at a tiny config: a frozen Qwen2.5-VL text encoder (random
weights at the tiny size: the world's "language" is learned by the DiT's txt_in and attention),
the VAE trained by the `vae` stage, and the MMDiT trained here. Each step trains on a T2I batch
and an edit batch (Qwen-Image-Edit conditioning: the source latents are appended after the noisy
target tokens). A fraction of prompts is replaced by the empty prompt so that true CFG works at
sampling time.

Forward path x_t = (1 - t) x0 + t eps with target velocity v = eps - x0 (paper sec. 1); t is
drawn logit-normal with a `loss.uniform_time_fraction` share uniform instead, then optionally
shifted like the sampler's schedule (the tiny config: all uniform, shifted).
"""

from __future__ import annotations

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import config_lib, evaluation, optim, parallel, paths
from qwen_image_rl.data import captions, examples, world
from qwen_image_rl.data.tokenizer import build_qwen_tokenizer, load_tokenizer
from qwen_image_rl.models import text_encoding
from qwen_image_rl.models.mmdit import QwenImageTransformer
from qwen_image_rl.models.qwen2_5_vl import Qwen25VLTextModel
from qwen_image_rl.models.vae import QwenImageVAE, normalize_latents
from qwen_image_rl.pipelines.common import pack_latents
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.pipelines.prompt_encoding import (
  PromptTooLongError,
  encode_fixed_length,
  trim_padding,
)
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
from qwen_image_rl.rl.objectives.forward import accumulate_grads
from qwen_image_rl.sampling.schedule import FlowMatchSchedule
from qwen_image_rl.train_state import TrainState, create_train_state, keep_if_finite
from qwen_image_rl.trainers import common

# The pipelines' templates, so that training and sampling condition identically. The tiny world
# has no vision tower yet: edit prompts use the edit system prompt without the image
# placeholder, and the source image reaches the DiT through the VAE path only.
T2I_TEMPLATE = QwenImagePipeline.TEMPLATE
EDIT_TEMPLATE = QwenImageEditPipeline.TEMPLATE


REQUIRED = {
  "total_steps": int,
  "seed": int,
  "data.image_size": int,
  "data.t2i_batch_size": int,
  "data.edit_batch_size": int,
  "data.num_train": int,
  "data.max_text_tokens": int,
  "loss.cfg_dropout": float,
  "loss.edit_weight": float,
  "loss.uniform_time_fraction": float,
  "loss.shift_like_sampler": bool,
}


def validate(config):
  config_lib.check_positive(
    config,
    "total_steps",
    "data.t2i_batch_size",
    "data.num_train",
    "data.image_size",
    "data.max_text_tokens",
  )
  config_lib.check_fields(config, {"model.vae_from": str})
  check_micro_batches(config.data)
  if not config.model.vae_from:
    raise config_lib.ConfigError(
      "config.model.vae_from is required: a diffusers-format VAE "
      "directory (the `vae` stage exports WORKDIR/export/vae)"
    )
  if not paths.isdir(config.model.vae_from):
    raise config_lib.ConfigError(
      f"config.model.vae_from={config.model.vae_from!r} is not a directory"
    )
  if not 0.0 <= config.loss.uniform_time_fraction <= 1.0:
    raise config_lib.ConfigError(
      f"config.loss.uniform_time_fraction={config.loss.uniform_time_fraction}: must be in [0, 1]"
    )
  config_lib.check_fields(config, {"loss.shift_like_sampler": bool})
  if not config.loss.get("time_shift_scale", 1.0) > 0:
    raise config_lib.ConfigError(
      f"config.loss.time_shift_scale={config.loss.time_shift_scale}: must be > 0"
    )
  t2i_categories(config.data)
  if not 0.0 <= config.loss.cfg_dropout < 1.0:
    raise config_lib.ConfigError(
      f"config.loss.cfg_dropout={config.loss.cfg_dropout}: must be in [0, 1)"
    )


def check_micro_batches(data):
  """data.micro_batches (default 1) must split both per-step batches into equal parts."""
  n = data.get("micro_batches", 1)
  if not isinstance(n, int) or n < 1:
    raise config_lib.ConfigError(f"config.data.micro_batches={n!r}: expected an integer >= 1")
  for name in ("t2i_batch_size", "edit_batch_size"):
    if data[name] % n:
      raise config_lib.ConfigError(
        f"config.data.micro_batches={n} must divide config.data.{name}={data[name]}"
      )


# ---------------------------------------------------------------------------------------------
# Frozen components and precomputed conditioning.
# ---------------------------------------------------------------------------------------------


def build_tokenizer(directory: str):
  """The run's tokenizer, saved to `directory` by process 0. Other processes build the same one
  in a scratch directory: they must neither write the shared workdir nor read a half-written
  file."""
  if not parallel.is_primary():
    with tempfile.TemporaryDirectory() as scratch:
      return build_qwen_tokenizer(captions.vocabulary(), scratch)
  if os.path.isfile(os.path.join(directory, "tokenizer.json")):
    return load_tokenizer(directory)
  return build_qwen_tokenizer(captions.vocabulary(), directory)


def build_text_encoder(config, tokenizer):
  fields = dict(config.model.text_encoder)
  seed = fields.pop("seed")
  model = Qwen25VLTextModel(vocab_size=len(tokenizer), **fields)
  params = nn.meta.unbox(
    model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))[
      "params"
    ]
  )
  return model, params


def encode_texts(te_model, te_params, tokenizer, texts, template, max_tokens: int):
  """Prompt conditioning [N, max_tokens, H] and masks [N, max_tokens]; a prompt longer than
  max_tokens is a ConfigError (training must see what sampling sees)."""
  drop = text_encoding.template_drop_index(tokenizer, template)
  try:
    return encode_fixed_length(
      te_model, te_params, tokenizer, texts, template=template, drop_idx=drop, length=max_tokens
    )
  except PromptTooLongError as e:
    raise config_lib.ConfigError(f"config.data.max_text_tokens={max_tokens} {e}") from e


def encode_images(vae: QwenImageVAE, vae_params, images_uint8, chunk: int = 128):
  """Normalised VAE latents [N, h, w, z] of uint8 images."""
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
  out = []
  for i in range(0, len(images_uint8), chunk):
    out.append(np.asarray(encode(vae_params, examples.to_model_range(images_uint8[i : i + chunk]))))
  z = np.concatenate(out)
  return np.asarray(
    normalize_latents(
      z, np.asarray(vae.latents_mean, np.float32), np.asarray(vae.latents_std, np.float32)
    )
  )


# ---------------------------------------------------------------------------------------------
# Loss and step.
# ---------------------------------------------------------------------------------------------


def sample_training_times(key, batch: int, uniform_fraction: float = 0.0, shift: float = 1.0):
  """t in (0, 1): logit-normal, a `uniform_fraction` of the batch uniform instead, then shifted
  by s t / (1 + (s - 1) t).

  The logit-normal alone almost never draws t > 0.95 (0.2% of samples), yet the sampler's first
  steps start at t = 1 and decide the layout and colours from the prompt alone; a uniform share
  trains them.
  """
  k_ln, k_u, k_pick = jax.random.split(key, 3)
  t = jnp.where(
    jax.random.uniform(k_pick, (batch,)) < uniform_fraction,
    jax.random.uniform(k_u, (batch,)),
    jax.nn.sigmoid(jax.random.normal(k_ln, (batch,))),
  )
  return shift * t / (1.0 + (shift - 1.0) * t)


def flow_matching_draws(key, x0, uniform_fraction=0.0, shift=1.0):
  """The random part of a flow-matching batch: times t [B] (`sample_training_times`) and noise
  eps shaped like the packed latents x0."""
  k_t, k_eps = jax.random.split(key)
  t = sample_training_times(k_t, x0.shape[0], uniform_fraction, shift)
  return t, jax.random.normal(k_eps, x0.shape)


def velocity_loss(model, params, x0, cond, mask, t, eps, ref_latents=None):
  """MSE between predicted and true velocity (eps - x0) at x_t = (1 - t) x0 + t eps. x0 and
  ref_latents (editing's source image): packed latents."""
  x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * eps
  side = int(round(np.sqrt(x0.shape[1])))
  img_shapes = ((1, side, side),)
  inputs = x_t
  if ref_latents is not None:
    inputs = jnp.concatenate([x_t, ref_latents], axis=1)
    img_shapes = img_shapes + ((1, side, side),)
  v = model.apply({"params": params}, inputs, cond, mask, t, img_shapes)
  return jnp.mean((v - (eps - x0)) ** 2)


def make_train_step(
  model,
  tx,
  rules,
  cfg_dropout: float,
  edit_weight: float,
  uniform_time_fraction: float = 0.0,
  shift: float = 1.0,
  micro_batches: int = 1,
):
  """step(state, batch) -> (state, metrics), to be jitted by the caller.

  The step draws its text dropout, times and noise for the whole batch, then accumulates the
  gradient over `micro_batches` equal parts of the T2I and edit batches (one scan): the same
  gradient to rounding, but each part's activations stay in cache on CPU (README, Benchmarks).
  """

  def drop_text(key, cond, mask, null_cond, null_mask):
    drop = jax.random.uniform(key, (cond.shape[0],)) < cfg_dropout
    return (
      jnp.where(drop[:, None, None], null_cond[None], cond),
      jnp.where(drop[:, None], null_mask[None], mask),
    )

  def draw(batch, key):
    """Per task, the loss inputs of every example with its random draws."""
    keys = jax.random.split(key, 4)
    parts = {}
    for i, task in enumerate(("t2i", "edit")):
      x0 = batch[f"{task}_x0"]
      cond, mask = drop_text(
        keys[2 * i],
        batch[f"{task}_cond"],
        batch[f"{task}_mask"],
        batch[f"{task}_null_cond"],
        batch[f"{task}_null_mask"],
      )
      t, eps = flow_matching_draws(keys[2 * i + 1], x0, uniform_time_fraction, shift)
      parts[task] = dict(x0=x0, cond=cond, mask=mask, t=t, eps=eps)
    parts["edit"]["ref_latents"] = batch["edit_ref_latents"]
    return parts

  def loss_fn(params, parts):
    t2i = velocity_loss(model, params, **parts["t2i"])
    edit = velocity_loss(model, params, **parts["edit"])
    loss = (t2i + edit_weight * edit) / (1.0 + edit_weight)
    return loss, {"loss": loss, "t2i_loss": t2i, "edit_loss": edit}

  def step(state: TrainState, batch):
    key = jax.random.fold_in(state.key(), state.step)
    with nn.logical_axis_rules(rules):
      grads, metrics = accumulate_grads(loss_fn, state.params, draw(batch, key), micro_batches)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1, params=jax.tree.map(jnp.add, state.params, updates), opt_state=opt_state
    )
    return keep_if_finite(state, new, metrics["loss"]), metrics

  return step


# ---------------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------------


def training_arrays(config, vae, vae_params, te_model, te_params, tokenizer):
  """(t2i examples, edit examples, per-example arrays, the empty prompts' embeddings)."""
  data = config.data
  print("sft: rendering and encoding the training set ...", flush=True)
  t2i = examples.t2i_examples(
    config.seed, data.num_train, "train", data.image_size, t2i_categories(data)
  )
  edits = examples.edit_examples(config.seed, data.num_train_edits, "train", data.image_size)
  length = data.max_text_tokens
  arrays = {
    "t2i_x0": pack_latents(encode_images(vae, vae_params, t2i.images)),
    "edit_x0": pack_latents(encode_images(vae, vae_params, edits.targets)),
    "edit_ref_latents": pack_latents(encode_images(vae, vae_params, edits.sources)),
  }
  # Each task's text stream is as long as its longest prompt needs (edit instructions are short),
  # not data.max_text_tokens: the same loss, fewer tokens in every block.
  nulls = {}
  for task, texts, template in (
    ("t2i", t2i.prompts, T2I_TEMPLATE),
    ("edit", edits.instructions, EDIT_TEMPLATE),
  ):
    # The last row is the empty prompt: what CFG dropout trains and sampling uses as negative.
    cond, mask = trim_padding(
      *encode_texts(te_model, te_params, tokenizer, [*texts, ""], template, length)
    )
    arrays[f"{task}_cond"], arrays[f"{task}_mask"] = cond[:-1], mask[:-1]
    nulls[f"{task}_null_cond"], nulls[f"{task}_null_mask"] = cond[-1], mask[-1]
  print(
    f"sft: {len(t2i)} T2I and {len(edits)} edit examples; latent tokens "
    f"{arrays['t2i_x0'].shape[1]}, text tokens {arrays['t2i_cond'].shape[1]} (T2I) and "
    f"{arrays['edit_cond'].shape[1]} (edit), limit {length}",
    flush=True,
  )
  return t2i, edits, arrays, nulls


def t2i_categories(data) -> tuple[str, ...]:
  """The categories the T2I training scenes cycle through (data.t2i_categories; a category
  named twice gets twice the share). Default: every category once."""
  names = tuple(data.get("t2i_categories", None) or world.CATEGORIES)
  try:
    return tuple(world.check_category(name) for name in names)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.data.t2i_categories: {e}") from None


def time_shift(config, image_tokens: int) -> float:
  """The sampler's resolution shift of training times (loss.shift_like_sampler) times
  loss.time_shift_scale (default 1), else 1."""
  if not config.loss.shift_like_sampler:
    return 1.0
  shift = FlowMatchSchedule.from_config(config.model.scheduler).time_shift_factor(image_tokens)
  shift *= config.loss.get("time_shift_scale", 1.0)
  print(
    f"sft: training times shifted like the sampler's at {image_tokens} tokens (factor {shift:.3f})",
    flush=True,
  )
  return shift


def export_and_evaluate(config, ctx, components, export: str):
  """Writes export/pipeline (process 0) and evaluates the held-out sets if asked."""
  t2i_pipe = QwenImagePipeline(*components)
  edit_pipe = QwenImageEditPipeline(*components)
  if parallel.is_primary():
    common.save_export(t2i_pipe.save_pretrained, os.path.join(export, "pipeline"))
  if not evaluation.enabled(config.eval):
    return None
  print("sft: evaluating on held-out prompts and edits ...", flush=True)
  results = evaluation.evaluate(
    t2i_pipe, edit_pipe, config.eval, step=config.total_steps, seed=config.seed, logger=ctx.logger
  )
  print(evaluation.format_table(results), flush=True)
  return results


def train(config, workdir):
  """Flow-matching pretraining of the tiny Qwen-Image base (T2I + edit)."""
  from qwen_image_rl.convert.vae import load_vae

  ctx = common.make_context(config, workdir)
  data = config.data
  export = os.path.join(workdir, "export")
  tokenizer = build_tokenizer(os.path.join(export, "tokenizer"))
  te_model, te_params = build_text_encoder(config, tokenizer)
  vae, vae_params = load_vae(paths.local_copy(config.model.vae_from))
  vae_params = vae_params["params"] if "params" in vae_params else vae_params
  t2i, edits, arrays, nulls = training_arrays(
    config, vae, vae_params, te_model, te_params, tokenizer
  )

  transformer_cfg = dict(config.model.transformer)
  transformer_cfg.update(
    in_channels=4 * vae.z_dim, out_channels=vae.z_dim, joint_attention_dim=te_model.hidden_size
  )
  model = QwenImageTransformer.from_config(
    transformer_cfg, **config_lib.transformer_overrides(config)
  )
  tx = optim.make_optimizer(config.optim, config.total_steps, keep_param_average=True)
  state, shardings = create_train_state(model.init_params, tx, ctx.mesh, ctx.rules, config.seed)
  state, start = common.restore_or_keep(ctx, state, shardings)

  global_nulls = {
    k: parallel.host_to_global(v, parallel.replicated(ctx.mesh)) for k, v in nulls.items()
  }

  def batch_for_step(step):
    ti = examples.batch_indices(config.seed, step, len(t2i), data.t2i_batch_size, stream=0)
    ei = examples.batch_indices(config.seed, step, len(edits), data.edit_batch_size, stream=1)
    batch = {k: v[ti] for k, v in arrays.items() if k.startswith("t2i")}
    batch.update({k: v[ei] for k, v in arrays.items() if k.startswith("edit")})
    # Every process draws the same global batch; each places only its own shards.
    batch = {
      k: parallel.host_to_global(v, parallel.batch_sharding(ctx.mesh, v.shape, ctx.rules))
      for k, v in batch.items()
    }
    batch.update(global_nulls)
    return batch

  loss = config.loss
  shift = time_shift(config, arrays["t2i_x0"].shape[1])
  step_fn = jax.jit(
    make_train_step(
      model,
      tx,
      ctx.rules,
      loss.cfg_dropout,
      loss.edit_weight,
      loss.uniform_time_fraction,
      shift,
      micro_batches=data.get("micro_batches", 1),
    ),
    donate_argnums=(0,),
    out_shardings=(shardings, None),
  )
  with parallel.sharding_context(ctx.mesh, ctx.rules):
    state, _ = common.fit(
      ctx,
      state,
      train_step=step_fn,
      batch_for_step=batch_for_step,
      start_step=start,
      total_steps=config.total_steps,
    )
  # The weight average, when kept, is what a diffusion model samples best from. to_host runs on
  # every process: a collective where the params span hosts.
  keeps_average = config.optim.get("ema_decay", 0.0) > 0
  params = parallel.to_host(optim.ema_params(state.opt_state) if keeps_average else state.params)
  scheduler = dict(config.model.scheduler)
  components = (model, params, vae, vae_params, te_model, te_params, tokenizer, scheduler)
  results = export_and_evaluate(config, ctx, components, export)
  ctx.close()
  return results
