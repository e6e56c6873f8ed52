"""Config sections shared by every trainer. Each trainer's config file starts from `base()`."""

import ml_collections

from qwen_image_rl.parallel.partitioning import DEFAULT_LOGICAL_AXIS_RULES


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = ml_collections.config_dict.placeholder(str)
  c.seed = 0
  c.distributed = "auto"  # 'auto' | 'always' | 'never': jax.distributed.initialize on pods.
  c.init_from = ""  # A workdir or a diffusers-format directory; '' starts from random weights.

  c.mesh = mesh()
  c.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

  c.total_steps = 100
  c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, async_save=True))
  c.log = ml_collections.ConfigDict(dict(every=10, progress_every=20, images_every=0))
  # jax.profiler trace of steps start_step+1 .. start_step+num_steps into WORKDIR/profile.
  c.profile = ml_collections.ConfigDict(dict(start_step=1, num_steps=0))
  c.optim = ml_collections.ConfigDict(
    dict(
      name="adamw",
      lr=1e-4,
      warmup_steps=0,
      schedule="constant",
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip_norm=1.0,
      ema_decay=0.0,  # > 0 keeps an average of the weights (optim.ema_params), e.g. 0.99
    )
  )
  return c


def tiny_eval(
  num_t2i: int | None = None, num_edits: int | None = None
) -> ml_collections.ConfigDict:
  """Held-out tiny world evaluation: sampling settings and set sizes (128 prompts and 64 edits
  unless num_t2i / num_edits are given)."""
  cfg = ml_collections.ConfigDict(
    dict(
      split="val",
      num_t2i=128,
      num_edits=64,
      image_size=64,
      num_steps=20,
      cfg_scale=4.0,
      negative_prompt="",
      batch_size=32,
      max_text_tokens=48,
    )
  )
  for key, value in (("num_t2i", num_t2i), ("num_edits", num_edits)):
    if value is not None:
      cfg[key] = value
  return cfg
