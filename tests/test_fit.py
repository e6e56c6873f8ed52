"""The shared step loop (`trainers.common.fit`): a step's metrics are read after the next step is
dispatched, except where a checkpoint needs its state; skipped (non-finite) updates and the stop
after too many in a row behave as when every step was read at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common as common_config
from qwen_image_rl.train_state import keep_if_finite
from qwen_image_rl.trainers import common


def _context(tmp_path, save_every: int, total_steps: int):
  config = common_config.base()
  config.mesh = common_config.mesh(data=1)
  config.total_steps = total_steps
  config.checkpoint.every = save_every
  config.checkpoint.async_save = False
  config.log.every = 1
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  return common.make_context(config, str(tmp_path), mesh)


def _step(nan_at=()):
  """A donated jitted step: w += k at step k (the batch); its loss is w after the update, NaN at
  the steps in nan_at (whose update is then skipped)."""

  def step(state, k):
    new = {"w": state["w"] + k}
    loss = jnp.where(jnp.isin(k, jnp.asarray(nan_at or (-1,), jnp.float32)), jnp.nan, new["w"])
    return keep_if_finite(state, new, loss), {"loss": loss}

  return jax.jit(step, donate_argnums=(0,))


def _state():
  return {"w": jnp.zeros(())}


def _step_number(step: int):
  return jnp.float32(step + 1)


def test_fit_reads_each_step_after_dispatching_the_next_except_where_it_saves(
  tmp_path, monkeypatch
):
  events = []
  read = common.scalar_metrics
  monkeypatch.setattr(common, "scalar_metrics", lambda m: events.append("read") or read(m))
  step = _step()

  def train_step(state, batch):
    events.append(f"step {int(batch)}")
    return step(state, batch)

  ctx = _context(tmp_path, save_every=3, total_steps=7)
  state, history = common.fit(
    ctx,
    _state(),
    train_step=train_step,
    batch_for_step=_step_number,
    start_step=0,
    total_steps=7,
  )
  assert events == [
    "step 1", "step 2", "read",  # step 1 read while step 2 runs
    "step 3", "read", "read",  # step 2, then step 3 at once: it saves
    "step 4", "step 5", "read",
    "step 6", "read", "read",
    "step 7", "read",  # the last step is read before the final save
  ]  # fmt: skip
  # The same values as reading each step at once: w after step k is 1 + 2 + ... + k.
  assert [h["step"] for h in history] == list(range(1, 8))
  assert [h["loss"] for h in history] == [k * (k + 1) / 2 for k in range(1, 8)]
  assert float(state["w"]) == 28.0
  assert ctx.checkpointer.all_steps() == [3, 6, 7]
  restored, extra = ctx.checkpointer.restore(_state(), step=6)
  assert extra["step"] == 6 and float(restored["w"]) == 21.0
  ctx.close()


def test_fit_skips_nonfinite_updates_and_stops_after_three_in_a_row(tmp_path, capsys):
  ctx = _context(tmp_path, save_every=2, total_steps=5)
  state, history = common.fit(
    ctx,
    _state(),
    train_step=_step(nan_at=(3,)),
    batch_for_step=_step_number,
    start_step=0,
    total_steps=5,
  )
  assert "step 3: non-finite loss, update skipped (1 in a row)" in capsys.readouterr().out
  assert [h["step"] for h in history] == [1, 2, 4, 5]
  assert float(state["w"]) == 1 + 2 + 4 + 5  # step 3's update was skipped
  ctx.close()

  ctx = _context(tmp_path / "stop", save_every=2, total_steps=9)
  with pytest.raises(common.NonFiniteError, match="3 consecutive steps .* at step 7.* step 4"):
    common.fit(
      ctx,
      _state(),
      train_step=_step(nan_at=(5, 6, 7, 8)),
      batch_for_step=_step_number,
      start_step=0,
      total_steps=9,
    )
  assert ctx.checkpointer.latest_step() == 4
  ctx.close()
