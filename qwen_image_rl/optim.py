"""Optimiser and learning-rate schedule from `config.optim`."""

from __future__ import annotations

import optax

from qwen_image_rl.config_lib import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  lr, warmup = float(optim.lr), int(optim.warmup_steps)
  if optim.schedule not in SCHEDULES:
    raise ConfigError(f"config.optim.schedule={optim.schedule!r} is not one of {list(SCHEDULES)}")
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then the configured optimiser."""
  if optim.name not in OPTIMIZERS:
    raise ConfigError(f"config.optim.name={optim.name!r} is not one of {list(OPTIMIZERS)}")
  lr = learning_rate_schedule(optim, total_steps)
  if optim.name == "adamw":
    opt = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  elif optim.name == "adam":
    opt = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  else:
    opt = optax.sgd(lr)
  chain = [opt]
  if optim.grad_clip_norm and optim.grad_clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(optim.grad_clip_norm))
  return optax.chain(*chain)
