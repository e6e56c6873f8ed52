"""The train state carried between steps, and its sharded initialisation.

The state is a flat dataclass of arrays so it checkpoints as one pytree; the RNG is stored as raw
key data (uint32) because typed keys do not serialise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from qwen_image_rl import parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data, see `key()`

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def create_train_state(
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  mesh: Mesh,
  rules,
  seed: int,
):
  """Initialise params and optimiser state directly in their shardings.

  `init_params(key)` returns logically annotated params (boxed, as from `model.init`). Optax state
  built from boxed params keeps the boxes, so moments inherit the parameters' shardings.
  Returns (state, state_shardings).
  """

  def init(seed_key):
    param_key, rng = jax.random.split(seed_key)
    params = init_params(param_key)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(rng),
    )

  seed_key = jax.random.key(seed)
  abstract = jax.eval_shape(init, seed_key)
  shardings = parallel.tree_shardings(abstract, mesh, rules)
  with parallel.sharding_context(mesh, rules):
    state = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(seed_key)
  return state, shardings


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target of a checkpoint."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )


def keep_if_finite(old, new, value):
  """Inside a jitted step: `new` if `value` is finite, else `old` (a skipped update)."""
  ok = jnp.isfinite(value)
  return jax.tree.map(lambda a, b: jnp.where(ok, b, a), old, new)
