"""Optimiser and learning-rate schedule from `config.optim`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


class ParamEmaState(NamedTuple):
  inner: Any
  count: jax.Array
  ema: Any


def with_param_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  """`tx`, plus an exponential moving average of the updated parameters in the optimiser state.

  Living in the optimiser state, the average is checkpointed, restored and sharded like the
  parameters' moments. The effective decay min(decay, (1 + n) / (10 + n)) lets the early average
  follow the fast-moving weights instead of remembering the random init.
  """

  def init(params):
    return ParamEmaState(tx.init(params), jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("with_param_ema needs the parameters in update()")
    updates, inner = tx.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    n = state.count.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(e.dtype), state.ema, new_params)
    return updates, ParamEmaState(inner, state.count + 1, ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state):
  """The parameter average kept by `with_param_ema` (an optimiser state built with it)."""
  if not isinstance(opt_state, ParamEmaState):
    raise TypeError("this optimiser state keeps no parameter average (optim.ema_decay=0)")
  return opt_state.ema


def make_optimizer(
  optim, total_steps: int, keep_param_average: bool = False
) -> optax.GradientTransformation:
  """Gradient clipping by global norm, the configured optimiser, and, with optim.ema_decay > 0,
  an average of the parameters (`ema_params`) for trainers that export it
  (`keep_param_average`)."""
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
  tx = optax.chain(*chain)
  decay = float(optim.get("ema_decay", 0.0))
  if not 0.0 <= decay < 1.0:
    raise ConfigError(f"config.optim.ema_decay={decay}: must be in [0, 1)")
  if decay > 0 and not keep_param_average:
    raise ConfigError(
      f"config.optim.ema_decay={decay}: this trainer exports its raw weights and keeps no "
      "parameter average (only the sft trainer does); set it to 0"
    )
  return with_param_ema(tx, decay) if decay > 0 else tx
