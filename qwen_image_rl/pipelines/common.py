"""Shared pieces of the Qwen-Image sampling pipelines.

- Packing: the DiT sees 2x2 latent patches flattened channel-major, exactly diffusers'
  `_pack_latents` (`b c (h p) (w q) -> b (h w) (c p q)`), but our latents are NHWC.
- `denoise`: the whole flow-matching Euler loop (with Qwen-Image's norm-rescaled true CFG,
  `sampling.guidance.guided_velocity`, the velocity the RL rollouts and objectives use too) as
  ONE jitted computation, a `fori_loop` over the sigma array with params as arguments.
- `PipelineBase`: components in memory (models + params), `from_pretrained` reading the
  diffusers directory layout and `save_pretrained` writing one that diffusers loads.

Deliberate differences from diffusers, each numerically neutral in float32:
- CFG runs the conditional and negative passes as one forward of batch 2B (text padded to a
  common length with masked keys: RoPE and attention make that exact up to rounding); diffusers
  makes two calls.
- The latents carried through the loop stay float32 (diffusers casts them back to the model
  dtype after every step; identical for float32 models, more accurate for bfloat16 ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import paths
from qwen_image_rl.convert.safetensors_io import CheckpointError, read_json
from qwen_image_rl.models import text_encoding
from qwen_image_rl.models.vae import denormalize_latents, normalize_latents
from qwen_image_rl.parallel.context import sharding_context
from qwen_image_rl.parallel.partitioning import DEFAULT_LOGICAL_AXIS_RULES
from qwen_image_rl.sampling.guidance import guided_velocity
from qwen_image_rl.sampling.schedule import FlowMatchSchedule, euler_step

DIFFUSERS_VERSION = "0.42.1"
MODEL_INDEX = "model_index.json"


def find_pipeline_dir(path: str) -> str | None:
  """The pipeline `path` names (itself, or a workdir's export/pipeline) as a local directory, a
  URL's tree downloaded once (paths.local_copy); None when neither holds model_index.json."""
  return paths.find_export(path, "pipeline", lambda d: paths.isfile(paths.join(d, MODEL_INDEX)))


def require_pipeline_dir(path: str, name: str, error: type[Exception] = FileNotFoundError) -> str:
  """find_pipeline_dir(path), or `error` naming the setting or flag `name` that gave `path`."""
  directory = find_pipeline_dir(path)
  if directory:
    return directory
  raise error(
    f"{name}={path!r}: no {MODEL_INDEX} there nor in its export/pipeline (pass a pipeline "
    "exported by a trainer, or its workdir)"
  )


# diffusers' `default_sample_size`: default height/width = 128 * vae_scale_factor.
DEFAULT_SAMPLE_SIZE = 128
OUTPUT_TYPES = ("np", "float", "latent")
LATENT_AXES = ("act_batch", "act_length", "act_embed")


# ------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------


def pack_latents(latents):
  """NHWC latents [B, h, w, C] -> packed tokens [B, (h/2)(w/2), 4C], channel-major in each 4C.

  Works on numpy and jax arrays. h and w must be even.
  """
  b, h, w, c = latents.shape
  if h % 2 or w % 2:
    raise ValueError(f"pack_latents: latent height/width must be even, got {h}x{w}")
  x = latents.reshape(b, h // 2, 2, w // 2, 2, c)  # b, hh, p, ww, q, c
  x = x.transpose(0, 1, 3, 5, 2, 4)  # b, hh, ww, c, p, q
  return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(packed, height: int, width: int):
  """Inverse of `pack_latents`: [B, (h/2)(w/2), 4C] -> [B, h, w, C] (h, w = latent size)."""
  b, n, d = packed.shape
  if n != (height // 2) * (width // 2) or d % 4:
    raise ValueError(
      f"unpack_latents: {tuple(packed.shape)} does not pack a {height}x{width} "
      f"latent (need {(height // 2) * (width // 2)} tokens, channels % 4 == 0)"
    )
  x = packed.reshape(b, height // 2, width // 2, d // 4, 2, 2)  # b, hh, ww, c, p, q
  x = x.transpose(0, 1, 4, 2, 5, 3)  # b, hh, p, ww, q, c
  return x.reshape(b, height, width, d // 4)


def latent_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
  """Latent (h, w) for an image size, as diffusers' `prepare_latents`: 2 * (H // (2 * vsf)).

  Sizes not divisible by 2 * vae_scale_factor are floored (diffusers only warns), so the decoded
  image is (h * vsf, w * vsf).
  """
  step = 2 * vae_scale_factor
  h, w = 2 * (int(height) // step), 2 * (int(width) // step)
  if h == 0 or w == 0:
    raise ValueError(
      f"height={height}, width={width}: each must be at least {step} (2 * vae_scale_factor) pixels"
    )
  return h, w


def img_shape(latent_h: int, latent_w: int) -> tuple[int, int, int]:
  """The transformer's (frame, height, width) in patches for a latent of this size."""
  return (1, latent_h // 2, latent_w // 2)


# ------------------------------------------------------------------------------------------
# The jitted denoising loop
# ------------------------------------------------------------------------------------------


def denoise(
  model: nn.Module,
  img_shapes,
  params,
  latents,
  cond,
  mask,
  neg_cond,
  neg_mask,
  sigmas,
  cfg_scale,
  ref_latents=None,
):
  """Integrate the flow ODE from sigmas[0] to sigmas[-1] with Euler steps (pure, traceable).

  Args:
    model: a QwenImageTransformer; img_shapes: ((1, h/2, w/2), [reference shapes...]).
    params: the transformer's params (unboxed).
    latents: packed noise [B, S, 4C]; cond/mask: prompt embeddings [B, T, D] / [B, T] or None.
    neg_cond/neg_mask: negative-prompt text, or None for no CFG.
    sigmas: [N + 1] float32 (FlowMatchSchedule.sigmas); cfg_scale: scalar.
    ref_latents: packed, normalised reference latents [B, S_ref, 4C] (edit) or None.
  Returns:
    float32 packed latents [B, S, 4C].
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  x = jnp.asarray(latents, jnp.float32)

  def step(i, x):
    x = nn.with_logical_constraint(x, LATENT_AXES)
    v = guided_velocity(
      model,
      params,
      x,
      sigmas[i],
      cond,
      mask,
      neg_cond,
      neg_mask,
      cfg_scale=cfg_scale,
      img_shapes=img_shapes,
      ref_latents=ref_latents,
    )
    return euler_step(x, v, sigmas[i], sigmas[i + 1])

  return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, x)


@functools.cache
def make_denoise(model: nn.Module, img_shapes: tuple):
  """`denoise` jitted for one model and image layout:

    fn(params, latents, cond, mask, neg_cond, neg_mask, sigmas, cfg_scale,
       ref_latents=None) -> float32 packed latents

  Pass None for neg_cond/neg_mask to sample without CFG (a separate compile).
  """
  img_shapes = tuple(tuple(int(v) for v in s) for s in img_shapes)
  return jax.jit(functools.partial(denoise, model, img_shapes))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def decode_packed(vae, vae_params, packed, latent_h: int, latent_w: int):
  """Packed normalised latents -> float32 images [B, H, W, 3] in [0, 1] (diffusers postprocess)."""
  z = unpack_latents(packed.astype(jnp.float32), latent_h, latent_w)
  z = denormalize_latents(z, vae.latents_mean, vae.latents_std)
  image = vae.apply(vae_params, z, method="decode")
  return jnp.clip(image * 0.5 + 0.5, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def encode_normalized(vae, vae_params, images):
  """Images [B, H, W, 3] in [-1, 1] -> normalised posterior-mode latents [B, h, w, z]."""
  z = vae.apply(vae_params, images, method="encode")
  return normalize_latents(z, vae.latents_mean, vae.latents_std)


def to_uint8(images) -> np.ndarray:
  """[0, 1] float images -> uint8, rounding like diffusers' numpy_to_pil."""
  return (np.asarray(images) * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Components, loading and saving
# ------------------------------------------------------------------------------------------

_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _check_component(root: str, name: str, required: Sequence[str]) -> str:
  directory = os.path.join(root, name)
  if not os.path.isdir(directory):
    raise CheckpointError(
      f"{directory}: missing component directory '{name}/' "
      f"(listed in {os.path.join(root, MODEL_INDEX)})"
    )
  for f in required:
    if not os.path.isfile(os.path.join(directory, f)):
      raise CheckpointError(f"missing file: {os.path.join(directory, f)}")
  return directory


def _check_tokenizer_dir(root: str) -> str:
  directory = _check_component(root, "tokenizer", ())
  if not any(
    all(os.path.isfile(os.path.join(directory, f)) for f in files) for files in _TOKENIZER_FILES
  ):
    raise CheckpointError(
      f"{directory}: no tokenizer files (need tokenizer.json, or vocab.json + merges.txt)"
    )
  return directory


def scheduler_config(schedule: FlowMatchSchedule, base: Mapping[str, Any] | None = None) -> dict:
  """A diffusers scheduler_config.json dict for `schedule` (keeping other keys of `base`)."""
  config = dict(base or {})
  config.update(dataclasses.asdict(schedule))
  config["_class_name"] = "FlowMatchEulerDiscreteScheduler"
  config["_diffusers_version"] = DIFFUSERS_VERSION
  return config


def _write_json(obj, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


class PipelineBase:
  """Models, params, tokenizer and schedule of a Qwen-Image pipeline, in memory.

  Build it from components (training code: `Pipeline(transformer, transformer_params, vae,
  vae_params, text_encoder, text_encoder_params, tokenizer, schedule)`) or with
  `from_pretrained(dir)`. The text encoder and tokenizer may be None when callers always pass
  prompt embeddings. With `mesh`, every jitted call runs under `mesh` and the logical axis
  `rules`, so sharded params work unchanged.
  """

  PIPELINE_CLASS = ""
  TEMPLATE = ""
  EXTRA_MODEL_INDEX: dict = {}

  def __init__(
    self,
    transformer,
    transformer_params,
    vae,
    vae_params,
    text_encoder=None,
    text_encoder_params=None,
    tokenizer=None,
    schedule: FlowMatchSchedule | Mapping[str, Any] | None = None,
    *,
    drop_idx: int | None = None,
    text_encoder_extra: Mapping[str, Any] | None = None,
    mesh=None,
    rules=DEFAULT_LOGICAL_AXIS_RULES,
  ):
    self.transformer = transformer
    self.transformer_params = nn.meta.unbox(transformer_params)
    self.vae = vae
    vae_params = nn.meta.unbox(vae_params)
    self.vae_params = vae_params if "params" in vae_params else {"params": vae_params}
    self.text_encoder = text_encoder
    self.text_encoder_params = (
      None if text_encoder_params is None else nn.meta.unbox(text_encoder_params)
    )
    self.tokenizer = tokenizer
    if schedule is None:
      schedule = FlowMatchSchedule()
    if isinstance(schedule, Mapping):
      self._scheduler_config = dict(schedule)
      schedule = FlowMatchSchedule.from_config(schedule)
    else:
      self._scheduler_config = None
    self.schedule = schedule
    self.text_encoder_extra = text_encoder_extra
    self.mesh = mesh
    self.rules = tuple(rules)
    if drop_idx is None and tokenizer is not None:
      drop_idx = text_encoding.template_drop_index(tokenizer, self.TEMPLATE)
    self.drop_idx = drop_idx
    if transformer.in_channels != 4 * vae.z_dim:
      raise ValueError(
        f"transformer in_channels={transformer.in_channels} must be 4 * vae "
        f"z_dim ({vae.z_dim}): the DiT sees 2x2 patches of VAE latents"
      )

  # --- properties ------------------------------------------------------------------------

  @property
  def vae_scale_factor(self) -> int:
    return self.vae.spatial_compression_ratio

  @property
  def latent_channels(self) -> int:
    return self.vae.z_dim

  def _context(self):
    """The sharding context of jitted calls (a no-op without a mesh: the caller's, if any)."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding_context(self.mesh, self.rules)

  # --- loading / saving -------------------------------------------------------------------

  @classmethod
  def from_pretrained(
    cls,
    directory: str,
    dtype=jnp.float32,
    *,
    vae_dtype=None,
    load_text_encoder: bool = True,
    transformer_overrides=None,
    **kwargs,
  ):
    """Load a diffusers-format Qwen-Image directory (model_index.json + component folders).

    dtype: params + compute dtype of the transformer and text encoder (VAE: `vae_dtype`,
      default `dtype`). load_text_encoder=False skips text_encoder/ and tokenizer/ (callers
      then pass prompt embeddings). transformer_overrides: our own transformer fields
      (scan_layers, remat_policy, attention_query_chunk). Missing files raise CheckpointError
      naming the path.
    """
    from qwen_image_rl.convert.text_encoder import load_text_encoder as load_te
    from qwen_image_rl.convert.transformer import load_transformer
    from qwen_image_rl.convert.vae import load_vae
    from qwen_image_rl.data.tokenizer import load_tokenizer

    if not os.path.isdir(directory):
      raise CheckpointError(f"pipeline directory not found: {directory}")
    index = read_json(os.path.join(directory, MODEL_INDEX))
    for name in ("transformer", "vae", "scheduler"):
      if name not in index:
        raise CheckpointError(f"{os.path.join(directory, MODEL_INDEX)}: no '{name}' entry")
    transformer_dir = _check_component(directory, "transformer", ("config.json",))
    vae_dir = _check_component(directory, "vae", ("config.json",))
    scheduler_dir = _check_component(directory, "scheduler", ("scheduler_config.json",))
    transformer, transformer_params = load_transformer(
      transformer_dir, dtype=dtype, **(transformer_overrides or {})
    )
    vae_dtype = vae_dtype or dtype
    vae, vae_params = load_vae(vae_dir, dtype=vae_dtype, param_dtype=vae_dtype)
    schedule = read_json(os.path.join(scheduler_dir, "scheduler_config.json"))
    text_encoder = text_encoder_params = tokenizer = extra = None
    if load_text_encoder:
      te_dir = _check_component(directory, "text_encoder", ("config.json",))
      tokenizer = load_tokenizer(_check_tokenizer_dir(directory))
      text_encoder, text_encoder_params, extra = load_te(te_dir, dtype=dtype, return_extra=True)
    return cls(
      transformer,
      transformer_params,
      vae,
      vae_params,
      text_encoder,
      text_encoder_params,
      tokenizer,
      schedule,
      text_encoder_extra=extra,
      **kwargs,
    )

  def save_pretrained(self, directory: str) -> None:
    """Write a directory that diffusers' pipeline class `from_pretrained` loads (and we do).

    The text encoder's vision tower / lm_head are written from `text_encoder_extra` (kept by
    `from_pretrained`). A pipeline built from components without it gets a text_config-only
    config, and transformers then initialises a default-size vision tower at load time.
    """
    from qwen_image_rl.convert.text_encoder import save_text_encoder
    from qwen_image_rl.convert.transformer import save_transformer
    from qwen_image_rl.convert.vae import save_vae

    os.makedirs(directory, exist_ok=True)
    index = {
      "_class_name": self.PIPELINE_CLASS,
      "_diffusers_version": DIFFUSERS_VERSION,
      "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
      "transformer": ["diffusers", "QwenImageTransformer2DModel"],
      "vae": ["diffusers", "AutoencoderKLQwenImage"],
      "text_encoder": [None, None],
      "tokenizer": [None, None],
      **self.EXTRA_MODEL_INDEX,
    }
    save_transformer(
      self.transformer, self.transformer_params, os.path.join(directory, "transformer")
    )
    save_vae(self.vae, self.vae_params, os.path.join(directory, "vae"))
    os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
    _write_json(
      scheduler_config(self.schedule, self._scheduler_config),
      os.path.join(directory, "scheduler", "scheduler_config.json"),
    )
    if self.text_encoder is not None:
      extra = self.text_encoder_extra or {}
      save_text_encoder(
        self.text_encoder,
        self.text_encoder_params,
        os.path.join(directory, "text_encoder"),
        extra_state=extra.get("state"),
        config=extra.get("config"),
      )
      index["text_encoder"] = ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    if self.tokenizer is not None:
      self.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
      index["tokenizer"] = ["transformers", "Qwen2Tokenizer"]
    _write_json(index, os.path.join(directory, MODEL_INDEX))

  # --- shared call steps ------------------------------------------------------------------

  def encode_prompt(self, prompt, max_sequence_length: int = 512):
    """Prompt(s) -> (embeds [B, T, D], mask [B, T]) with this pipeline's template."""
    if self.text_encoder is None or self.tokenizer is None:
      raise ValueError(
        f"{type(self).__name__} has no text encoder/tokenizer: pass "
        f"prompt_embeds (+ prompt_embeds_mask) instead of a prompt"
      )
    with self._context():
      return text_encoding.encode_prompts(
        self.text_encoder,
        self.text_encoder_params,
        self.tokenizer,
        prompt,
        template=self.TEMPLATE,
        drop_idx=self.drop_idx,
        max_sequence_length=max_sequence_length,
      )

  def _prompt_inputs(
    self, prompt, embeds, mask, num_images_per_prompt, max_sequence_length, what: str
  ):
    """diffusers' check_inputs + encode_prompt: text or embeddings, repeated per image."""
    if prompt is not None and embeds is not None:
      raise ValueError(f"pass either `{what}` or `{what}_embeds`, not both")
    if prompt is not None:
      if not isinstance(prompt, (str, list, tuple)):
        raise ValueError(f"`{what}` must be a str or a list of str, got {type(prompt)}")
      embeds, mask = self.encode_prompt(
        list(prompt) if not isinstance(prompt, str) else prompt, max_sequence_length
      )
    embeds = jnp.asarray(embeds)[:, :max_sequence_length]
    if embeds.ndim != 3 or embeds.shape[-1] != self.transformer.joint_attention_dim:
      raise ValueError(
        f"`{what}_embeds` shape {embeds.shape}: expected [B, T, "
        f"{self.transformer.joint_attention_dim}]"
      )
    if mask is not None:
      mask = jnp.asarray(mask)[:, :max_sequence_length].astype(jnp.int32)
      if mask.shape != embeds.shape[:2]:
        raise ValueError(f"`{what}_embeds_mask` shape {mask.shape} != embeds {embeds.shape[:2]}")
      mask = jnp.repeat(mask, num_images_per_prompt, axis=0)
    embeds = jnp.repeat(embeds, num_images_per_prompt, axis=0)
    return embeds.astype(self.transformer.dtype), mask

  def _text_inputs(
    self,
    prompt,
    prompt_embeds,
    prompt_embeds_mask,
    negative_prompt,
    negative_prompt_embeds,
    negative_prompt_embeds_mask,
    true_cfg_scale,
    num_images_per_prompt,
    max_sequence_length,
  ):
    """(batch size, embeds, mask, neg_embeds or None, neg_mask) with diffusers' CFG rule."""
    if prompt is None and prompt_embeds is None:
      raise ValueError("provide either `prompt` or `prompt_embeds`")
    if max_sequence_length > text_encoding.TOKENIZER_MAX_LENGTH:
      raise ValueError(
        f"max_sequence_length={max_sequence_length} cannot be greater than "
        f"{text_encoding.TOKENIZER_MAX_LENGTH}"
      )
    if negative_prompt is not None and negative_prompt_embeds is not None:
      raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
    if num_images_per_prompt < 1:
      raise ValueError(f"num_images_per_prompt={num_images_per_prompt}: must be >= 1")
    embeds, mask = self._prompt_inputs(
      prompt,
      prompt_embeds,
      prompt_embeds_mask,
      num_images_per_prompt,
      max_sequence_length,
      "prompt",
    )
    has_neg = negative_prompt is not None or negative_prompt_embeds is not None
    neg_embeds = neg_mask = None
    if true_cfg_scale > 1 and has_neg:  # diffusers' do_true_cfg
      neg_embeds, neg_mask = self._prompt_inputs(
        negative_prompt,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        num_images_per_prompt,
        max_sequence_length,
        "negative_prompt",
      )
      if neg_embeds.shape[0] != embeds.shape[0]:
        raise ValueError(
          f"negative prompt batch {neg_embeds.shape[0]} != prompt batch "
          f"{embeds.shape[0]} (after num_images_per_prompt)"
        )
    return embeds.shape[0], embeds, mask, neg_embeds, neg_mask

  def _initial_latents(self, batch: int, latent_h: int, latent_w: int, seed, latents):
    """Packed float32 noise [B, S, 4C]: given (packed or NHWC) or drawn from `seed`."""
    expected = (batch, (latent_h // 2) * (latent_w // 2), 4 * self.latent_channels)
    if latents is not None:
      latents = jnp.asarray(latents, jnp.float32)
      if latents.ndim == 4:
        latents = pack_latents(latents)
      if latents.shape != expected:
        raise ValueError(
          f"latents shape {latents.shape}: expected packed {expected} (or NHWC "
          f"[{batch}, {latent_h}, {latent_w}, {self.latent_channels}])"
        )
      return latents
    if seed is None:
      seed = int(np.random.default_rng().integers(2**31))
    noise = jax.random.normal(
      jax.random.key(seed), (batch, latent_h, latent_w, self.latent_channels), jnp.float32
    )
    return pack_latents(noise)

  def _sample(
    self,
    img_shapes,
    latents,
    cond,
    mask,
    neg_cond,
    neg_mask,
    num_steps,
    true_cfg_scale,
    ref_latents=None,
  ):
    image_seq_len = latents.shape[1]
    sigmas = self.schedule.sigmas(num_steps, image_seq_len)
    fn = make_denoise(self.transformer, tuple(img_shapes))
    with self._context():
      return fn(
        self.transformer_params,
        latents,
        cond,
        mask,
        neg_cond,
        neg_mask,
        jnp.asarray(sigmas),
        jnp.float32(true_cfg_scale),
        ref_latents,
      )

  def _output(self, packed, latent_h, latent_w, output_type: str):
    if output_type == "latent":
      return packed
    with self._context():
      images = decode_packed(self.vae, self.vae_params, packed, latent_h, latent_w)
    images = np.asarray(images)
    return images if output_type == "float" else to_uint8(images)


def check_output_type(output_type: str) -> None:
  if output_type not in OUTPUT_TYPES:
    raise ValueError(
      f"output_type={output_type!r}: expected one of {OUTPUT_TYPES} ('np' = "
      f"uint8 [B,H,W,3], 'float' = float32 in [0,1], 'latent' = packed latents)"
    )


def default_hw(height, width, vae_scale_factor: int) -> tuple[int, int]:
  size = DEFAULT_SAMPLE_SIZE * vae_scale_factor
  return int(height or size), int(width or size)


__all__ = [
  "PipelineBase",
  "decode_packed",
  "denoise",
  "encode_normalized",
  "img_shape",
  "latent_size",
  "make_denoise",
  "pack_latents",
  "scheduler_config",
  "to_uint8",
  "unpack_latents",
]
