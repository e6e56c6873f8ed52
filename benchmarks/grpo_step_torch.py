"""The tiny GRPO iteration in PyTorch + diffusers: the speed reference for our JAX iteration.

  python benchmarks/grpo_step_torch.py [--init_from=runs/demo/base/export/pipeline]
      [--iterations=3] [--image_size=64]

The same work as one iteration of `configs/grpo_t2i.py:tiny` (benchmarks/grpo_step.py), written
from the equations with diffusers' `QwenImageTransformer2DModel` and `AutoencoderKLQwenImage`:

- rollout: B = prompts x G trajectories of N Euler steps from sigma = 1 with true CFG (the
  conditional and negative branches as one forward of batch 2B, Qwen's norm-rescaled
  combination); on the K trained steps a Flow-GRPO SDE step whose state, next state and Gaussian
  log-prob are kept. Timed without and with the VAE decode of the final latents.
- update: one forward + backward of the conditional branch on the B x K recorded transitions
  (the hybrid-CFG objective), PPO-clipped ratio against the step's own log-probs (on-policy, ratio
  1, as our trainer does with one update per batch), global-norm clipping and AdamW.

Prompt embeddings are random tensors of the trainer's shape (48 tokens, a negative of the same
length): the text encoder is not part of an iteration. Without --init_from the model has the
shapes of TINY_TRANSFORMER / TINY_VAE below and random weights. Times are medians
over --iterations after one warm-up iteration; the peak is a 2048x2048 float32 matmul.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

# The issue-18 reference shapes: the tiny MMDiT (configs/sft.py:tiny) on 8x8x16 latents
# (16 image tokens beside 48 text tokens), with a tiny VAE that downsamples 4x (32 px images).
TINY_TRANSFORMER = dict(
  patch_size=2,
  in_channels=64,
  out_channels=16,
  num_layers=4,
  attention_head_dim=32,
  num_attention_heads=4,
  joint_attention_dim=64,
  axes_dims_rope=(8, 12, 12),
)
TINY_VAE = dict(
  base_dim=16,
  z_dim=16,
  dim_mult=[1, 2, 4],
  num_res_blocks=1,
  attn_scales=[],
  temperal_downsample=[False, True],
)


def load_models(init_from: str):
  from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

  if init_from:
    transformer = QwenImageTransformer2DModel.from_pretrained(
      os.path.join(init_from, "transformer")
    )
    vae = AutoencoderKLQwenImage.from_pretrained(os.path.join(init_from, "vae"))
  else:
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKLQwenImage(**TINY_VAE)
  return transformer.float(), vae.float().eval()


def shifted_sigmas(num_steps: int, image_tokens: int) -> torch.Tensor:
  """Qwen-Image's schedule: linear sigmas, exponential resolution shift (mu linear in tokens)."""
  mu = 0.5 + (0.9 - 0.5) * (image_tokens - 256) / (8192 - 256)
  s = np.linspace(1.0, 1.0 / num_steps, num_steps)
  s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
  return torch.tensor(np.append(s, 0.0), dtype=torch.float32)


def true_cfg(cond, uncond, scale):
  comb = uncond + scale * (cond - uncond)
  return comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


def sde_mean_std(x, v, t, t_next, noise_level):
  """Flow-GRPO's transition (sampling/sde.py): t, t_next broadcastable to x."""
  denominator_t = torch.where(t >= 1.0, t_next, t)
  sigma = noise_level * torch.sqrt(t / (1.0 - denominator_t))
  delta = t - t_next
  mean = x * (1.0 - sigma**2 * delta / (2.0 * t)) - v * delta * (
    1.0 + sigma**2 * (1.0 - t) / (2.0 * t)
  )
  return mean, sigma * torch.sqrt(delta)


def gaussian_log_prob(x_next, mean, std):
  density = -((x_next - mean) ** 2) / (2.0 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
  return density.mean(dim=tuple(range(1, x_next.ndim)))


class Work:
  """The shapes and inputs of one iteration, shared by the rollout and the update."""

  def __init__(self, transformer, vae, batch: int, image_size: int, num_steps: int, train_idx):
    cfg = transformer.config
    downsample = 2 ** (len(vae.config.dim_mult) - 1)
    self.latent_hw = image_size // downsample // cfg.patch_size
    self.tokens = self.latent_hw**2
    self.channels = cfg.in_channels
    self.batch = batch
    self.img_shapes = [[(1, self.latent_hw, self.latent_hw)]] * (2 * batch)
    g = torch.Generator().manual_seed(0)
    self.cond = torch.randn(batch, 48, cfg.joint_attention_dim, generator=g)
    self.neg = torch.randn(batch, 48, cfg.joint_attention_dim, generator=g)
    self.mask = torch.ones(batch, 48, dtype=torch.int64)
    self.mask[:, 40:] = 0  # captions are padded to the text budget
    self.sigmas = shifted_sigmas(num_steps, self.tokens)
    self.train_idx = list(train_idx)


def velocity(transformer, x, sigma, cond, mask, img_shapes):
  t = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])
  return transformer(
    hidden_states=x,
    encoder_hidden_states=cond,
    encoder_hidden_states_mask=mask,
    timestep=t,
    img_shapes=img_shapes,
    return_dict=False,
  )[0]


@torch.no_grad()
def rollout(transformer, work: Work, cfg_scale: float, noise_level: float, seed: int):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(work.batch, work.tokens, work.channels, generator=g)
  both_cond = torch.cat([work.cond, work.neg])
  both_mask = torch.cat([work.mask, work.mask])
  kept = {"t": [], "next": [], "logp": []}
  for i in range(len(work.sigmas) - 1):
    t, t_next = work.sigmas[i], work.sigmas[i + 1]
    v = velocity(transformer, torch.cat([x, x]), t, both_cond, both_mask, work.img_shapes)
    v = true_cfg(*v.chunk(2), cfg_scale)
    if i in work.train_idx:
      mean, std = sde_mean_std(x, v, t, t_next, noise_level)
      x_next = mean + std * torch.randn(x.shape, generator=g)
      kept["t"].append(x)
      kept["next"].append(x_next)
      kept["logp"].append(gaussian_log_prob(x_next, mean, std))
      x = x_next
    else:
      x = x + (t_next - t) * v
  return x, {k: torch.stack(v, dim=1) for k, v in kept.items()}


@torch.no_grad()
def vae_decode(vae, latents, work: Work):
  """Unpack [B, (h w), (c 2 2)] tokens to [B, c, 1, 2h, 2w] and decode (latent scaling omitted)."""
  b, hw, c4 = latents.shape
  h = work.latent_hw
  z = (
    latents.view(b, h, h, c4 // 4, 2, 2)
    .permute(0, 3, 1, 4, 2, 5)
    .reshape(b, c4 // 4, 1, 2 * h, 2 * h)
  )
  return vae.decode(z, return_dict=False)[0]


def update(transformer, optimizer, work: Work, kept, advantages, *, noise_level, clip_eps):
  b, k = kept["logp"].shape
  x = kept["t"].reshape(b * k, work.tokens, work.channels)
  x_next = kept["next"].reshape(b * k, work.tokens, work.channels)
  t = work.sigmas[work.train_idx].repeat(b)
  t_next = work.sigmas[[i + 1 for i in work.train_idx]].repeat(b)
  cond = work.cond.repeat_interleave(k, dim=0)
  mask = work.mask.repeat_interleave(k, dim=0)
  v = velocity(transformer, x, t, cond, mask, work.img_shapes[:1] * (b * k))
  mean, std = sde_mean_std(x, v, t[:, None, None], t_next[:, None, None], noise_level)
  logp = gaussian_log_prob(x_next, mean, std).view(b, k)
  ratio = torch.exp(logp - logp.detach())
  adv = advantages[:, None]
  loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)).mean()
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
  optimizer.step()
  return float(loss.detach())


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  a = torch.randn(n, n)
  a @ a
  start = time.perf_counter()
  for _ in range(repeats):
    a @ a
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def run(
  init_from: str = "",
  iterations: int = 3,
  prompts: int = 8,
  group_size: int = 8,
  num_steps: int = 10,
  train_idx=(0, 2, 4),
  image_size: int = 32,
  cfg_scale: float = 4.0,
  noise_level: float = 0.8,
  clip_eps: float = 0.01,
  lr: float = 1e-4,
) -> dict:
  """Median seconds of the rollout (transformer only), VAE decode, update and iteration."""
  transformer, vae = load_models(init_from)
  work = Work(transformer, vae, prompts * group_size, image_size, num_steps, train_idx)
  optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
  rows = []
  for it in range(iterations + 1):  # iteration 0 warms up
    t0 = time.perf_counter()
    final, kept = rollout(transformer.eval(), work, cfg_scale, noise_level, seed=it)
    t1 = time.perf_counter()
    vae_decode(vae, final, work)
    t2 = time.perf_counter()
    advantages = torch.randn(work.batch)
    update(
      transformer.train(),
      optimizer,
      work,
      kept,
      advantages,
      noise_level=noise_level,
      clip_eps=clip_eps,
    )
    t3 = time.perf_counter()
    if it > 0:
      rows.append(dict(rollout=t1 - t0, decode=t2 - t1, update=t3 - t2, total=t3 - t0))
  return {k: float(np.median([r[k] for r in rows])) for k in rows[0]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--init_from", default="")
  parser.add_argument("--iterations", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=32)
  args = parser.parse_args()
  med = run(args.init_from, args.iterations, image_size=args.image_size)
  peak = matmul_peak()
  print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 64 = 8 x G=8, "
    f"10 steps, K=3, true CFG 4 in the rollout, conditional update"
  )
  print(
    f"rollout (transformer): {med['rollout']:.2f} s; VAE decode {med['decode']:.2f} s; "
    f"update {med['update']:.2f} s; iteration {med['total']:.2f} s"
  )
  print(f"peak (2048^2 f32 matmul, same run): {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
