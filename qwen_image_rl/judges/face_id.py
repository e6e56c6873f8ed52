"""Face-ID embedder: a small CNN trained with an ArcFace additive angular margin loss.

The paper's face-identity reward is "model-based, embedding-level, not a VLM"; ArcFace-style
cosine similarity between source and output faces is the natural reading (paper_spec sec. 6).
Tiny-world identities are (face shape, skin, eyes, hair): 3 * 4 * 4 * 4 = 192 of them. Training
varies what must NOT change the embedding (expression, glasses, noise, blur, small shifts);
`HELD_OUT` identities never appear in training and measure generalisation (the AUC).

Reward: face_id = clip(cos(e_source, e_output), 0, 1). ArcFace embeddings of different
identities sit near-orthogonal (cos ~ 0), so negative cosines carry no extra signal.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from qwen_image_rl.data import render
from qwen_image_rl.data import world as W

IDENTITIES = tuple(itertools.product(W.FACE_SHAPES, W.SKIN_TONES, W.EYE_COLOURS, W.HAIR_COLOURS))
STATES = tuple(itertools.product(W.EXPRESSIONS, (False, True)))
NUM_HELD_OUT = 40
# A fixed split of identities (independent of the run seed, so every run holds out the same).
_ORDER = np.random.default_rng(20260).permutation(len(IDENTITIES))
HELD_OUT = tuple(sorted(int(i) for i in _ORDER[:NUM_HELD_OUT]))
TRAIN = tuple(sorted(int(i) for i in _ORDER[NUM_HELD_OUT:]))


def identity_split(split: str) -> tuple[int, ...]:
  if split not in ('train', 'held_out'):
    raise ValueError(f"identity split {split!r}: expected 'train' or 'held_out'")
  return TRAIN if split == 'train' else HELD_OUT


def portrait(identity: int, state: int) -> W.PortraitScene:
  shape, skin, eyes, hair = IDENTITIES[identity]
  expression, glasses = STATES[state]
  return W.PortraitScene(
    face_shape=shape, skin=skin, eyes=eyes, hair=hair, expression=expression, glasses=glasses
  )


def render_bank(identities, size: int) -> np.ndarray:
  """uint8 [len(identities), len(STATES), size, size, 3]: every state of every identity."""
  return np.stack(
    [
      np.stack([render.render(portrait(i, s), size) for s in range(len(STATES))])
      for i in identities
    ]
  )


@dataclasses.dataclass(frozen=True)
class Augment:
  """Nuisances the embedding must ignore: pixel shifts, Gaussian noise, Gaussian blur."""

  max_shift: int = 2
  max_noise: float = 12.0
  blur_prob: float = 0.5
  max_blur: float = 1.2

  def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(images.shape, np.float32)
    for k, image in enumerate(images.astype(np.float32)):
      dy, dx = rng.integers(-self.max_shift, self.max_shift + 1, size=2)
      image = ndimage.shift(image, (dy, dx, 0), order=0, mode='nearest')
      if rng.random() < self.blur_prob:
        image = ndimage.gaussian_filter(image, (rng.uniform(0.3, self.max_blur),) * 2 + (0,))
      out[k] = image + rng.normal(0, rng.uniform(0, self.max_noise), image.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
  return (
    np.stack([ndimage.gaussian_filter(im.astype(np.float32), (sigma, sigma, 0)) for im in images])
    .round()
    .clip(0, 255)
    .astype(np.uint8)
  )


class FaceEmbedder(nn.Module):
  """uint8-range images [B, H, W, 3] (any square size) -> unit embeddings [B, dim]."""

  image_size: int = 32
  widths: tuple[int, ...] = (32, 64, 96)
  dim: int = 64

  @nn.compact
  def __call__(self, images):
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    if x.shape[1:3] != (self.image_size, self.image_size):
      x = jax.image.resize(
        x, (x.shape[0], self.image_size, self.image_size, 3), 'linear', antialias=True
      )
    x = nn.relu(nn.Conv(self.widths[0], (3, 3))(x))
    for width in self.widths:
      x = nn.relu(nn.Conv(width, (3, 3), strides=2)(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
    # Flatten, not global pooling: face shape is geometry, and eye / hair colours are only
    # meaningful at their place in the face.
    x = nn.relu(nn.Dense(4 * self.dim)(x.reshape(x.shape[0], -1)))
    return l2_normalize(nn.Dense(self.dim)(x))


def l2_normalize(x, axis=-1, eps=1e-6):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def arcface_logits(embeddings, class_weights, labels, *, scale: float, margin: float):
  """ArcFace (Deng et al. 2019): s * cos(theta_y + m) for the true class, s * cos(theta_j) else.

  Past theta + m > pi the margin term is no longer monotone in theta; there (cos theta < cos(pi -
  m)) the target logit is s * (cos theta - m sin m), insightface's fallback.
  """
  cos = l2_normalize(embeddings) @ l2_normalize(class_weights, axis=0)
  cos_y = jnp.take_along_axis(cos, labels[:, None], axis=1)[:, 0]
  sin_y = jnp.sqrt(jnp.clip(1.0 - cos_y**2, 0.0, 1.0))
  phi = cos_y * np.cos(margin) - sin_y * np.sin(margin)
  phi = jnp.where(cos_y > np.cos(np.pi - margin), phi, cos_y - margin * np.sin(margin))
  onehot = jax.nn.one_hot(labels, cos.shape[1], dtype=cos.dtype)
  return scale * jnp.where(onehot > 0, phi[:, None], cos)


def arcface_loss(embeddings, class_weights, labels, *, scale: float, margin: float):
  logits = arcface_logits(embeddings, class_weights, labels, scale=scale, margin=margin)
  return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


class FaceIdModel(nn.Module):
  """The embedder plus ArcFace class centres [dim, num_classes] (training only)."""

  embedder: FaceEmbedder
  num_classes: int

  @nn.compact
  def __call__(self, images):
    centres = self.param(
      'centres', nn.initializers.normal(1.0), (self.embedder.dim, self.num_classes)
    )
    return self.embedder(images), centres


# ---------------------------------------------------------------------------------------------
# Export / load and scoring.
# ---------------------------------------------------------------------------------------------

CONFIG_NAME, WEIGHTS_NAME = 'face_id_config.json', 'face_id.msgpack'


def save_embedder(embedder: FaceEmbedder, params, directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, WEIGHTS_NAME), 'wb') as f:
    f.write(flax.serialization.to_bytes(jax.device_get(params)))
  config = {'image_size': embedder.image_size, 'widths': list(embedder.widths), 'dim': embedder.dim}
  with open(os.path.join(directory, CONFIG_NAME), 'w') as f:
    json.dump(config, f, indent=2)


def load_embedder(directory: str):
  """(FaceEmbedder, params) from a directory written by `save_embedder`."""
  paths = [os.path.join(directory, n) for n in (CONFIG_NAME, WEIGHTS_NAME)]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
      f'face-ID embedder directory {directory!r} lacks {missing} (the '
      f'face_id trainer exports WORKDIR/export/face_id)'
    )
  with open(paths[0]) as f:
    config = json.load(f)
  embedder = FaceEmbedder(
    image_size=int(config['image_size']), widths=tuple(config['widths']), dim=int(config['dim'])
  )
  target = embedder.init(
    jax.random.key(0), jnp.zeros((1, embedder.image_size, embedder.image_size, 3))
  )['params']
  with open(paths[1], 'rb') as f:
    params = flax.serialization.from_bytes(target, f.read())
  return embedder, params


class FaceIdScorer:
  """Jitted embeddings and source/output similarity of a trained embedder."""

  def __init__(self, embedder: FaceEmbedder, params, batch_size: int = 64):
    self.embedder, self.params, self.batch_size = embedder, params, batch_size
    self._embed = jax.jit(lambda p, x: embedder.apply({'params': p}, x))

  @classmethod
  def load(cls, directory: str, **kw) -> FaceIdScorer:
    return cls(*load_embedder(directory), **kw)

  def embed(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    out = [
      np.asarray(self._embed(self.params, images[i : i + self.batch_size]))
      for i in range(0, len(images), self.batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, self.embedder.dim), np.float32)

  def cosine(self, images_a: np.ndarray, images_b: np.ndarray) -> np.ndarray:
    return np.sum(self.embed(images_a) * self.embed(images_b), axis=-1)

  def reward(self, sources: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """face_id in [0, 1]: clip(cos, 0, 1) of source and output embeddings."""
    return np.clip(self.cosine(sources, outputs), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Evaluation: same- vs different-identity AUC on held-out identities.
# ---------------------------------------------------------------------------------------------


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
  """P(score of a random positive > a random negative), ties counted half (Mann-Whitney)."""
  from scipy.stats import rankdata

  r = rankdata(np.concatenate([positive, negative]))
  n_pos, n_neg = len(positive), len(negative)
  return float((r[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def identity_pairs(
  identities, n_pairs: int, seed: int, size: int, augment: Augment | None, blur_sigma: float = 0.0
):
  """(images_a, images_b, same [n]): half same-identity pairs (different state / nuisance),
  half different-identity pairs, from `identities`."""
  rng = np.random.default_rng(seed)
  identities = list(identities)
  ia = rng.choice(identities, n_pairs)
  ib = ia.copy()
  same = np.arange(n_pairs) < n_pairs // 2
  for k in np.flatnonzero(~same):
    while ib[k] == ia[k]:
      ib[k] = rng.choice(identities)
  sa, sb = rng.integers(len(STATES), size=n_pairs), rng.integers(len(STATES), size=n_pairs)
  a = np.stack([render.render(portrait(int(i), int(s)), size) for i, s in zip(ia, sa)])
  b = np.stack([render.render(portrait(int(i), int(s)), size) for i, s in zip(ib, sb)])
  if augment is not None:
    a, b = augment(a, rng), augment(b, rng)
  if blur_sigma > 0:
    a, b = blur(a, blur_sigma), blur(b, blur_sigma)
  return a, b, same


def evaluate_auc(
  scorer: FaceIdScorer, n_pairs: int = 512, seed: int = 1, size: int = 64, identities=HELD_OUT
) -> dict:
  """Same- vs different-identity AUC of the cosine on clean, augmented and blurred renders."""
  out = {}
  for name, augment, sigma in (
    ('clean', None, 0.0),
    ('augmented', Augment(), 0.0),
    ('blurred', None, 1.5),
  ):
    a, b, same = identity_pairs(identities, n_pairs, seed, size, augment, sigma)
    cos = scorer.cosine(a, b)
    out[f'auc_{name}'] = auc(cos[same], cos[~same])
    out[f'cos_same_{name}'] = float(cos[same].mean())
    out[f'cos_diff_{name}'] = float(cos[~same].mean())
  return out
