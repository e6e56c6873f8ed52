"""The old policy of a forward-process objective, kept inside the optimiser state.

DiffusionNFT's implicit policies (and AWM's ratio after more than one update per batch) need a
second set of transformer weights theta_old next to theta. Wrapping the optimiser keeps them in
`TrainState.opt_state`: they are sharded like the params (optax state built from boxed params
keeps the boxes), checkpointed with the state, restored on resume, and left untouched by a
skipped (non-finite) step, with no change to the train state or the trainer loop.

After each update, with theta' the new params and n the number of updates so far:

  'ema'       theta_old <- d theta_old + (1 - d) theta',  d = min(ramp * n, decay)
              (DiffusionNFT's decay schedule: d grows from 0, on-policy at first, to `decay`);
  'snapshot'  theta_old <- theta' when n % refresh_every == 0, else unchanged (a frozen copy
              refreshed every `refresh_every` updates; refresh_every = inner_updates keeps the
              params of the iteration's start for all of its updates).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

MODES = ("ema", "snapshot")


class OldPolicyState(NamedTuple):
  inner: Any  # the wrapped optimiser's state
  params: Any  # theta_old, same tree and shardings as the params
  count: jax.Array  # int32 updates so far


def with_old_policy(
  tx: optax.GradientTransformation,
  *,
  mode: str,
  decay: float = 0.5,
  ramp: float = 0.001,
  refresh_every: int = 1,
) -> optax.GradientTransformation:
  """`tx` whose state also tracks theta_old (see the module docstring)."""
  if mode not in MODES:
    raise ValueError(f"old policy mode={mode!r}: expected one of {MODES}.")
  if not 0.0 <= decay < 1.0 or ramp < 0.0:
    raise ValueError(f"old policy: decay={decay} must be in [0, 1), ramp={ramp} >= 0.")
  if refresh_every < 1:
    raise ValueError(f"old policy: refresh_every={refresh_every} must be >= 1.")

  def init(params):
    # A copy, not the params themselves: the train step donates both.
    return OldPolicyState(tx.init(params), jax.tree.map(jnp.copy, params), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("with_old_policy needs the params in update() to track theta_old.")
    updates, inner = tx.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    count = state.count + 1
    if mode == "ema":
      d = jnp.minimum(ramp * count.astype(jnp.float32), decay)
      old = jax.tree.map(
        lambda o, p: (d * o + (1.0 - d) * p).astype(o.dtype), state.params, new_params
      )
    else:
      refresh = count % refresh_every == 0
      old = jax.tree.map(
        lambda o, p: jnp.where(refresh, p, o).astype(o.dtype), state.params, new_params
      )
    return updates, OldPolicyState(inner, old, count)

  return optax.GradientTransformation(init, update)


def old_params(opt_state):
  """theta_old from an optimiser state built by `with_old_policy`, else None."""
  return opt_state.params if isinstance(opt_state, OldPolicyState) else None
