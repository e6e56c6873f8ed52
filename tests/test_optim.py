"""The optimiser factory: schedules, configuration errors and the parameter average."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from qwen_image_rl import optim, parallel
from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.train_state import create_train_state
from tests.test_parallel import TinyMlp


def _optim(**overrides) -> ml_collections.ConfigDict:
  c = common.base().optim
  c.update(overrides)
  return c


def test_param_average_follows_the_updated_weights_with_its_warmup():
  decay = 0.9
  tx = optim.with_param_ema(optax.sgd(0.1), decay)
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  expected = np.array([1.0, -2.0])
  for n in range(30):
    grads = {"w": params["w"] * (n + 1)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    d = min(decay, (1 + n) / (10 + n))
    expected = d * expected + (1 - d) * np.asarray(params["w"])
  np.testing.assert_allclose(np.asarray(optim.ema_params(state)["w"]), expected, rtol=1e-5)
  # The average lags the weights: it is not a copy of them.
  assert not np.allclose(np.asarray(optim.ema_params(state)["w"]), np.asarray(params["w"]))


def test_param_average_is_sharded_like_the_parameters():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  model, x = TinyMlp(), jnp.zeros((16, 64))
  tx = optim.make_optimizer(_optim(ema_decay=0.99), 10, keep_param_average=True)
  state, shardings = create_train_state(
    lambda k: model.init(k, x)["params"], tx, mesh, parallel.DEFAULT_LOGICAL_AXIS_RULES, 0
  )
  ema = optim.ema_params(state.opt_state)
  for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(ema)):
    assert e.sharding == p.sharding
    np.testing.assert_array_equal(np.asarray(e), np.asarray(p))
  assert any(len(set(p.sharding.spec) - {None}) for p in jax.tree.leaves(state.params))


def test_bad_optimiser_settings_are_named():
  with pytest.raises(ConfigError, match="ema_decay=1.0"):
    optim.make_optimizer(_optim(ema_decay=1.0), 10, keep_param_average=True)
  with pytest.raises(ConfigError, match="only the sft trainer"):
    optim.make_optimizer(_optim(ema_decay=0.99), 10)
  with pytest.raises(ConfigError, match="optim.name='lion'"):
    optim.make_optimizer(_optim(name="lion"), 10)
  with pytest.raises(ConfigError, match="optim.schedule='step'"):
    optim.make_optimizer(_optim(schedule="step"), 10)
  with pytest.raises(TypeError, match="no parameter average"):
    optim.ema_params(optim.make_optimizer(_optim(), 10).init({"w": jnp.zeros(2)}))
