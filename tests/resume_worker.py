"""A tiny resumable training loop, run as a subprocess by tests/test_checkpoint.py.

An MLP regresses a fixed random target with optax adam; the batch of step `s` is drawn from
`fold_in(key(seed), s)`, so a resumed run sees exactly the data an uninterrupted one does. The
state holds a typed PRNG key that is split every step, to check key round trips.

Files the test watches, in --workdir:
  progress        last finished step (written atomically after each step)
  restored        the step this run resumed from ("none" on a fresh start)
  pausing         written by --pause_commit_at (below) just before it blocks
  final.npz       final params, flattened, after the last save is committed

--pause_commit_at=N blocks the background save of step N forever right before orbax's atomic
rename (all data and commit_success.txt already written in the tmp dir): the test kills the
process there, which is the worst moment for a save to die.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen_image_rl.checkpoint import Checkpointer


def _write_atomic(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _install_commit_pause(step: int, marker: str) -> None:
  """Block orbax's final rename of `<step>.orbax-checkpoint-tmp-*` forever."""
  from orbax.checkpoint._src.path import async_path

  original_rename = async_path.rename

  async def rename(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(src)).startswith(f"{step}.orbax-checkpoint-tmp"):
      _write_atomic(marker, str(step))
      while True:  # Wait for SIGKILL.
        time.sleep(1.0)
    return await original_rename(src, dst, *args, **kwargs)

  async_path.rename = rename


def init_state(seed: int, width: int):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {
    "hidden": {"kernel": jax.random.normal(k1, (8, width)) * 0.3, "bias": jnp.zeros((width,))},
    "out": {"kernel": jax.random.normal(k2, (width, 1)) * 0.3, "bias": jnp.zeros((1,))},
  }
  optimizer = optax.adam(1e-2)
  return optimizer, {
    "params": params,
    "opt_state": optimizer.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": k3,
  }


def batch_for_step(seed: int, step: int):
  kx = jax.random.fold_in(jax.random.key(seed + 1), step)
  x = jax.random.normal(kx, (32, 8))
  y = jnp.sin(x.sum(axis=1, keepdims=True))
  return x, y


def make_train_step(optimizer):

  def loss_fn(params, x, y, rng):
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    # Dropout-like noise so the rng key actually matters.
    h = h * (1.0 + 0.1 * jax.random.normal(rng, h.shape))
    pred = h @ params["out"]["kernel"] + params["out"]["bias"]
    return jnp.mean((pred - y) ** 2)

  @jax.jit
  def train_step(state, x, y):
    rng, step_rng = jax.random.split(state["rng"])
    grads = jax.grad(loss_fn)(state["params"], x, y, step_rng)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}

  return train_step


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--total_steps", type=int, default=20)
  parser.add_argument("--save_every", type=int, default=3)
  parser.add_argument("--keep", type=int, default=2)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sleep", type=float, default=0.05)
  parser.add_argument("--pause_commit_at", type=int, default=-1)
  args = parser.parse_args(argv)

  os.makedirs(args.workdir, exist_ok=True)
  if args.pause_commit_at >= 0:
    _install_commit_pause(args.pause_commit_at, os.path.join(args.workdir, "pausing"))

  optimizer, state = init_state(args.seed, args.width)
  train_step = make_train_step(optimizer)
  ckpt = Checkpointer(
    os.path.join(args.workdir, "checkpoints"), save_every=args.save_every, keep=args.keep
  )
  restored = ckpt.restore(jax.eval_shape(lambda: state))
  start = 0
  if restored is not None:
    state, extra = restored
    start = int(extra["next_step"])
    assert extra["seed"] == args.seed, extra
    assert int(state["step"]) == start, (int(state["step"]), start)
  _write_atomic(os.path.join(args.workdir, "restored"), "none" if restored is None else str(start))

  for step in range(start, args.total_steps):
    x, y = batch_for_step(args.seed, step)
    state = train_step(state, x, y)
    done = step + 1
    ckpt.maybe_save(done, state, {"next_step": done, "seed": args.seed})
    _write_atomic(os.path.join(args.workdir, "progress"), str(done))
    time.sleep(args.sleep)

  ckpt.save(args.total_steps, state, {"next_step": args.total_steps, "seed": args.seed})
  ckpt.close()
  flat = {
    "/".join(k.key for k in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]
  }
  flat["rng"] = np.asarray(jax.random.key_data(state["rng"]))
  np.savez(os.path.join(args.workdir, "final.npz"), **flat)
  return 0


if __name__ == "__main__":
  sys.exit(main())
