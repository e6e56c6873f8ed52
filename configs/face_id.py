"""Face-ID embedder for the `face_id` reward (ArcFace margin loss on tiny-world identities).

python -m qwen_image_rl.main --config=configs/face_id.py:tiny --workdir=runs/demo/face_id
python -m qwen_image_rl.judge_eval --judge=face_id:runs/demo/face_id/export/face_id
"""

import ml_collections

from configs import common


def get_config(arg: str = "tiny"):
  if arg not in ("tiny",):
    raise ValueError(f"configs/face_id.py: unknown variant {arg!r}; known: ['tiny']")
  c = common.base()
  c.trainer = "face_id"
  c.total_steps = 300
  c.model = ml_collections.ConfigDict(dict(widths=(32, 64, 96), dim=64))
  c.data = ml_collections.ConfigDict(
    dict(
      image_size=32,
      batch_size=64,
      augment=dict(max_shift=2, max_noise=12.0, blur_prob=0.5, max_blur=1.2),
    )
  )
  # ArcFace's s = 64 suits thousands of classes; with 152 a smaller scale trains faster.
  c.loss = ml_collections.ConfigDict(dict(scale=16.0, margin=0.3))
  c.eval = ml_collections.ConfigDict(dict(num_pairs=512, image_size=64))
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"
  c.checkpoint.every = 100
  c.log.every = 20
  return c
