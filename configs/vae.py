"""Tiny world VAE: the real QwenImageVAE module at a small config, trained on world renders.

  python -m qwen_image_rl.main --config=configs/vae.py:tiny --workdir=runs/demo/vae

Expected on a 2-core CPU: see README (tiny world table); exports WORKDIR/export/vae.
"""

import ml_collections

from configs import common


def get_config(arg: str = "tiny"):
  if arg not in ("tiny",):
    raise ValueError(f"configs/vae.py: unknown variant {arg!r}; known: ['tiny']")
  c = common.base()
  c.trainer = "vae"
  # 1200 steps of 16 images (was 600; 240 of 32 before that): the VAE was undertrained, and
  # what it lost capped every generator in its latent space. 600 -> 1200 steps: val PSNR 27.7
  # -> 32.0 dB; capped oracle on reconstructions 0.79 -> 0.95; strict 0.35 -> 0.78 on the 512
  # eval prompts (iris colours 0.30 -> 0.90); the base trained on it: strict 0.014 -> 0.037
  # (README, "The tiny world"; benchmarks/strict_blockers.py).
  c.total_steps = 1200
  c.model = ml_collections.ConfigDict(
    dict(
      vae=dict(
        base_dim=16,
        z_dim=8,
        dim_mult=(1, 2, 4),
        num_res_blocks=1,
        attn_scales=(),
        temperal_downsample=(False, True),
        dropout=0.0,
        input_channels=3,
        latents_mean=(0.0,) * 8,
        latents_std=(1.0,) * 8,
      )
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(image_size=64, batch_size=16, num_train=4096, num_eval=256)
  )
  c.loss = ml_collections.ConfigDict(dict(kl_weight=1e-4))
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.checkpoint.every = 200
  c.log.every = 25
  c.log.progress_every = 50
  return c
