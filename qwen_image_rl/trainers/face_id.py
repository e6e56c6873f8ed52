"""`face_id` trainer: the face-identity embedder with an ArcFace margin loss (judges/face_id.py).

Data: every state (expression x glasses) of every training identity, rendered once; each step
draws identities and states from (seed, step) and augments them (shifts, noise, blur) with a
Generator seeded by (seed, step), so a resumed run replays the same batches. Exports
WORKDIR/export/face_id and writes the held-out AUCs to WORKDIR/results/face_id_eval.json.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import config_lib, optim, parallel
from qwen_image_rl.judges import face_id as F
from qwen_image_rl.train_state import TrainState, create_train_state, keep_if_finite
from qwen_image_rl.trainers import common


def validate(config):
  config_lib.check_positive(
    config, "total_steps", "data.batch_size", "data.image_size", "model.dim", "loss.scale"
  )
  if not 0.0 <= config.loss.margin < np.pi / 2:
    raise config_lib.ConfigError(f"config.loss.margin={config.loss.margin}: must be in [0, pi/2)")


def make_train_step(model: F.FaceIdModel, tx, scale: float, margin: float):
  def loss_fn(params, images, labels):
    embeddings, centres = model.apply({"params": params}, images)
    return F.arcface_loss(embeddings, centres, labels, scale=scale, margin=margin)

  def step(state: TrainState, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch["images"], batch["labels"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1, params=jax.tree.map(jnp.add, state.params, updates), opt_state=opt_state
    )
    return keep_if_finite(state, new, loss), {"loss": loss}

  return step


REQUIRED = {
  "total_steps": int,
  "seed": int,
  "data.image_size": int,
  "data.batch_size": int,
  "model.dim": int,
  "model.widths": tuple,
  "loss.scale": float,
  "loss.margin": float,
  "eval.num_pairs": int,
}


def train(config, workdir):
  """Face-ID embedder (ArcFace margin loss on tiny-world portrait identities)."""
  ctx = common.make_context(config, workdir)
  size = config.data.image_size
  print(
    f"face_id: rendering {len(F.TRAIN)} training identities x {len(F.STATES)} states", flush=True
  )
  bank = F.render_bank(F.TRAIN, size)
  augment = F.Augment(**dict(config.data.augment))
  embedder = F.FaceEmbedder(
    image_size=size, widths=tuple(config.model.widths), dim=config.model.dim
  )
  model = F.FaceIdModel(embedder, num_classes=len(F.TRAIN))
  tx = optim.make_optimizer(config.optim, config.total_steps)
  init = lambda key: model.init(key, jnp.zeros((1, size, size, 3)))["params"]
  state, shardings = create_train_state(init, tx, ctx.mesh, ctx.rules, config.seed)
  state, start = common.restore_or_keep(ctx, state, shardings)

  def batch_for_step(step):
    rng = np.random.default_rng([config.seed, step])
    labels = rng.integers(len(F.TRAIN), size=config.data.batch_size)
    states = rng.integers(len(F.STATES), size=config.data.batch_size)
    images = augment(bank[labels, states], rng)
    put = lambda x: jax.device_put(x, parallel.batch_sharding(ctx.mesh, x.shape, ctx.rules))
    return {"images": put(images), "labels": put(labels.astype(np.int32))}

  step_fn = jax.jit(
    make_train_step(model, tx, config.loss.scale, config.loss.margin),
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
  params = jax.device_get(state.params)["embedder"]
  export = os.path.join(workdir, "export", "face_id")
  results = None
  if jax.process_index() == 0:
    F.save_embedder(embedder, params, export)
    if config.eval.num_pairs > 0:
      scorer = F.FaceIdScorer(embedder, params)
      results = F.evaluate_auc(scorer, n_pairs=config.eval.num_pairs, size=config.eval.image_size)
      os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
      with open(os.path.join(workdir, "results", "face_id_eval.json"), "w") as f:
        json.dump(results, f, indent=2)
      print("face_id: held-out identities " + json.dumps(results), flush=True)
  ctx.close()
  return results
