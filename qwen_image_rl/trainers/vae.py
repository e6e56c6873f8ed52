"""`vae` trainer: fit the tiny world's Qwen-Image VAE (the real module at a small config).

Real Qwen-Image checkpoints ship a trained VAE; the tiny world has none, so we train one on tiny
world renders: L2 reconstruction of a posterior sample plus a small KL, as a KL-regularised
autoencoder. At the end the per-channel latent mean/std over held-out images are written into
the VAE config (`latents_mean` / `latents_std`, as in the real checkpoint) and the VAE is
exported in diffusers layout to `WORKDIR/export/vae`.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import config_lib, evaluation, metrics, optim, parallel
from qwen_image_rl.convert.vae import save_vae
from qwen_image_rl.data import examples, oracle
from qwen_image_rl.models.vae import QwenImageVAE
from qwen_image_rl.train_state import TrainState, create_train_state, keep_if_finite
from qwen_image_rl.trainers import common

REQUIRED = {
  "total_steps": int,
  "seed": int,
  "data.image_size": int,
  "data.batch_size": int,
  "data.num_train": int,
  "data.num_eval": int,
  "loss.kl_weight": float,
}


def validate(config):
  config_lib.check_positive(
    config, "total_steps", "data.batch_size", "data.num_train", "data.num_eval", "data.image_size"
  )
  vae = QwenImageVAE.from_config(config.model.vae.to_dict())
  factor = vae.spatial_compression_ratio
  if config.data.image_size % factor:
    raise config_lib.ConfigError(
      f"config.data.image_size={config.data.image_size} is not divisible by the VAE's "
      f"compression factor {factor}"
    )


def vae_loss(model: QwenImageVAE, params, images, key, kl_weight: float):
  mean, logvar = model.apply({"params": params}, images, method=model.encode_moments)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  recon = model.apply({"params": params}, z, method=model.decode)
  mse = jnp.mean((recon - images) ** 2)
  kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
  return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def make_train_step(model, tx, kl_weight, rules):
  def step(state: TrainState, images):
    key = jax.random.fold_in(state.key(), state.step)
    with nn.logical_axis_rules(rules):
      (loss, aux), grads = jax.value_and_grad(vae_loss, argnums=1, has_aux=True)(
        model, state.params, images, key, kl_weight
      )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1, params=jax.tree.map(jnp.add, state.params, updates), opt_state=opt_state
    )
    return keep_if_finite(state, new, loss), {"loss": loss, **aux}

  return step


def psnr(a, b) -> float:
  """PSNR in dB between images in [-1, 1]."""
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def train(config, workdir):
  """Train the tiny world's VAE (reconstruction + KL) and export it in diffusers layout."""
  ctx = common.make_context(config, workdir)
  model = QwenImageVAE.from_config(config.model.vae.to_dict())
  data = config.data
  train_set = examples.t2i_examples(config.seed, data.num_train, "train", data.image_size)
  eval_set = examples.t2i_examples(config.seed, data.num_eval, "val", data.image_size)
  print(
    f"vae: {len(train_set)} train / {len(eval_set)} val images of {data.image_size}px", flush=True
  )

  tx = optim.make_optimizer(config.optim, config.total_steps)
  init = lambda key: model.init(key, model.dummy_images())["params"]
  state, shardings = create_train_state(init, tx, ctx.mesh, ctx.rules, config.seed)
  state, start = common.restore_or_keep(ctx, state, shardings)

  batch_sharding = parallel.batch_sharding(
    ctx.mesh, (data.batch_size, data.image_size, data.image_size, 3), ctx.rules
  )
  images = examples.to_model_range(train_set.images)

  def batch_for_step(step):
    idx = examples.batch_indices(config.seed, step, len(train_set), data.batch_size)
    return parallel.host_to_global(images[idx], batch_sharding)

  step_fn = jax.jit(
    make_train_step(model, tx, config.loss.kl_weight, ctx.rules),
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, None),
    donate_argnums=(0,),
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
    results = evaluate(ctx, model, state.params, eval_set, config)
  export_dir = os.path.join(workdir, "export", "vae")
  final = model.clone(
    latents_mean=tuple(results.pop("latents_mean")), latents_std=tuple(results.pop("latents_std"))
  )
  params = parallel.to_host(state.params)  # every process: a collective where params span hosts
  if parallel.is_primary():
    common.save_export(lambda local: save_vae(final, params, local), export_dir)
  ctx.logger.write_results(f"eval_{config.total_steps}", results)
  print(
    f"vae: val PSNR {results['psnr']:.2f} dB, oracle on reconstructions "
    f"{results['oracle_on_reconstructions']['overall']:.3f}; exported to {export_dir}",
    flush=True,
  )
  ctx.close()
  return results


def evaluate(ctx, model, params, eval_set, config):
  """Reconstruction PSNR on held-out images and the latent statistics for normalisation."""
  images = examples.to_model_range(eval_set.images)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
  latents, recon = [], []
  for i in range(0, len(images), 64):  # under the caller's sharding context
    z = encode(params, images[i : i + 64])
    latents.append(parallel.to_host(z))
    recon.append(parallel.to_host(decode(params, z)))
  latents, recon = np.concatenate(latents), np.concatenate(recon)
  n_show = min(8, len(images))
  grid = metrics.image_grid(
    np.concatenate([eval_set.images[:n_show], examples.to_uint8(recon[:n_show])]), n_show
  )
  ctx.logger.images(config.total_steps, {"eval/reconstructions": grid})
  flat = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
  by_category = {}
  for c in sorted(set(eval_set.categories)):
    m = np.array([x == c for x in eval_set.categories])
    by_category[c] = psnr(recon[m], images[m])
  # The oracle on reconstructions is the ceiling any generator in this latent space can reach.
  recon_scores, recon_checks = oracle.score_and_check_t2i_batch(
    examples.to_uint8(recon), eval_set.specs
  )
  ceiling = evaluation.summarise_t2i(recon_scores, eval_set.categories, recon_checks)
  return {
    "step": config.total_steps,
    "n_samples": len(images),
    "psnr": psnr(recon, images),
    "oracle_on_reconstructions": {
      "overall": ceiling["overall"],
      "by_category": ceiling["by_category"],
      "strict": ceiling["strict"],
      "strict_by_category": ceiling["strict_by_category"],
      "check_pass": ceiling["check_pass"],
    },
    "psnr_by_category": by_category,
    "latents_mean": flat.mean(0).tolist(),
    "latents_std": flat.std(0).tolist(),
  }
