"""Perception pre-training of a judge's vision tower on dense, oracle-exact targets.

A from-scratch judge learns its rubric's answer format long before it learns to look: after 400
steps of reward SFT alone its held-out Spearman with the oracle's aesthetics is about 0 (README,
learned rewards: the first row of the judge table). Real VLM
judges start from a vision encoder pre-trained on captions; this is the tiny world's version.

Each image is a training-split render, pixel-corrupted (noise, blur, impulses) or face-distorted
with some probability. Its targets, one sigmoid output each, are
  - the bag of words of the scene's caption (objects, colours, sizes, positions, relations,
    glyphs, face attributes, sky and ground): what alignment and instruction following read;
  - the oracle's image-quality dimensions (noise, sharpness, artefacts) in [0, 1], as soft
    labels: what aesthetics reads;
  - for portraits, the oracle's well-formed-face score: what the portrait reward reads;
  - with `bound_targets`, pseudo-words that bind attributes to objects and places (`bound_words`:
    'red@01', 'red_circle', 'A@0', 'sun@left'), which a bag of caption words cannot say;
  - with `dense_targets`, per image token the words of the objects it shows
    (`dense_targets.dense_targets`), read by a linear head shared by the tokens: binding by place.
The heads (an MLP over the flattened merged tokens, so positions stay readable; the per-token
head) are thrown away; the judge starts from the trained tower. A pure function of (seed,
config): a run that resumes before its first checkpoint repeats it exactly.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from qwen_image_rl.data import examples, oracle
from qwen_image_rl.judges import dense_targets as DT
from qwen_image_rl.judges import face_id as F
from qwen_image_rl.judges import judge_data as D
from qwen_image_rl.models.qwen2_5_vl_vision import Qwen25VLVisionModel, vision_layout

QUALITY_DIMS = ('noise', 'sharpness', 'artefacts')
# Corruptions that keep the caption true (a recolour would not), and how often each applies.
CORRUPTIONS = (D.noise, D.blur, D.impulses)
CLEAN, FACE = 0.4, 0.3  # P(clean render); P(face distortion | portrait, not clean)


@dataclasses.dataclass(frozen=True)
class PerceptionSet:
  """images uint8 [N, H, W, 3], targets float32 [N, K], mask float32 [N, K] (0: no label);
  dense float32 [N, T, len(DT.DENSE_WORDS)] per-token targets, or None."""

  images: np.ndarray
  targets: np.ndarray
  mask: np.ndarray
  words: tuple[str, ...]
  dense: np.ndarray | None = None

  @property
  def names(self) -> tuple[str, ...]:
    return (*self.words, *QUALITY_DIMS, 'well_formed')


def bound_words(spec) -> list[str]:
  """Pseudo-words that bind a scene's attributes to its objects and places, which its caption's
  bag of words cannot say: per shape its kind, colour and size at its cell, and its colour with
  its kind; per text slot its glyph; the sun or moon at its place; how many shapes or glyphs.
  A portrait has one face, whose words are bound already."""
  if spec.category == 'general':
    out = [f'#shapes={len(spec.shapes)}']
    for shape in spec.shapes:
      cell = f'@{shape.row}{shape.col}'
      out += [shape.kind + cell, shape.colour + cell, shape.size + cell]
      out.append(f'{shape.colour}_{shape.kind}')
    return out
  if spec.category == 'typography':
    return [f'#glyphs={len(spec.text)}'] + [f'{c}@{j}' for j, c in enumerate(spec.text)]
  if spec.category == 'landscape':
    return [f'{spec.body}@{spec.body_pos}', f'horizon={spec.horizon}']
  return []


def perception_set(
  seed: int,
  n: int,
  size: int,
  split: str = 'train',
  words=None,
  bound: bool = False,
  dense_grid: int = 0,
) -> PerceptionSet:
  """n labelled images from n scenes of `split` (`words`: the word columns; default: those of
  the captions, and with `bound` the scenes' `bound_words` too; unknown words are dropped;
  `dense_grid` > 0: per-token targets over a dense_grid x dense_grid token grid)."""
  ex = examples.t2i_examples(seed, n, split, size)
  tokens = [
    p.split() + (bound_words(spec) if bound else []) for p, spec in zip(ex.prompts, ex.specs)
  ]
  words = tuple(sorted({w for t in tokens for w in t})) if words is None else words
  column = {w: i for i, w in enumerate(words)}
  rng = np.random.default_rng([seed, 11])
  k = len(words) + len(QUALITY_DIMS) + 1
  images = np.empty_like(ex.images)
  targets, mask = np.zeros((n, k), np.float32), np.ones((n, k), np.float32)
  for i, (spec, image, scene_words) in enumerate(zip(ex.specs, ex.images, tokens)):
    if rng.random() >= CLEAN:
      if spec.category == 'portrait' and rng.random() < FACE:
        image = D.distort_face(image, rng)
      else:
        image = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))](image, rng)
    images[i] = image
    targets[i, [column[w] for w in scene_words if w in column]] = 1.0
    quality = oracle.image_quality(image)
    targets[i, len(words) : -1] = [quality[d] for d in QUALITY_DIMS]
    if spec.category == 'portrait':
      targets[i, -1] = oracle.score_t2i(image, spec)['well_formed']
    else:
      mask[i, -1] = 0.0
  dense = None
  if dense_grid:
    dense = np.stack([DT.dense_targets(spec, dense_grid) for spec in ex.specs])
  return PerceptionSet(images, targets, mask, words, dense)


def per_token_logits(tokens, dense_outputs: int):
  """[B, T, dense_outputs] from one linear map shared by all tokens [B, T, D] (None if 0): a
  token's words must be readable from that token alone."""
  return nn.Dense(dense_outputs, name='dense_head')(tokens) if dense_outputs else None


class PerceptionModel(nn.Module):
  """The judge's vision tower under a throwaway MLP head: (logits [B, K], per-token logits
  [B, T, dense_outputs] or None)."""

  visual: Qwen25VLVisionModel
  outputs: int
  hidden: int = 256
  dense_outputs: int = 0

  @nn.compact
  def __call__(self, pixel_values, layout, batch: int):
    tokens = self.visual(pixel_values, layout).reshape(
      batch, -1, self.visual.config.out_hidden_size
    )
    flat = tokens.reshape(batch, -1)
    logits = nn.Dense(self.outputs)(nn.gelu(nn.Dense(self.hidden)(flat)))
    return logits, per_token_logits(tokens, self.dense_outputs)


class GroundedPerceptionModel(nn.Module):
  """The tower under a head that grounds its tokens in words: (logits [B, K], per-token logits
  or None as in PerceptionModel).

  Each merged image token scores every word by a dot product with that word's embedding
  (`word_embedding` [n_words, D], D the language model's width), and an image's word logit is
  the log-sum-exp over its tokens (a word is there if some token shows it), plus a bias. The
  quality and face outputs come from the MLP over the flattened tokens, as in PerceptionModel.
  The judge's language model starts with these word embeddings in its own embedding table
  (reward_sft.with_pretrained_vision): an image token then looks like the words it shows, and a
  prompt word can find the token that shows it by matching embeddings.
  """

  visual: Qwen25VLVisionModel
  n_words: int
  outputs: int
  hidden: int = 256
  dense_outputs: int = 0

  @nn.compact
  def __call__(self, pixel_values, layout, batch: int):
    tokens = self.visual(pixel_values, layout).reshape(
      batch, -1, self.visual.config.out_hidden_size
    )
    embedding = self.param(
      'word_embedding', nn.initializers.normal(0.05), (self.n_words, tokens.shape[-1])
    )
    per_token = jnp.einsum('btd,wd->btw', tokens, embedding)
    words = jax.nn.logsumexp(per_token, axis=1) + self.param(
      'word_bias', nn.initializers.zeros, (self.n_words,)
    )
    flat = tokens.reshape(batch, -1)
    rest = nn.Dense(self.outputs - self.n_words)(nn.gelu(nn.Dense(self.hidden)(flat)))
    return jnp.concatenate([words, rest], axis=-1), per_token_logits(tokens, self.dense_outputs)


def bce(logits, targets, mask, n_words: int, balance_groups: bool = True):
  """Sigmoid cross-entropy, averaged within each target group (words, quality, face) and summed
  over the groups: a plain mean (balance_groups=False) gives the ~130 words 97% of the weight,
  and the tower learns content but does not see noise."""
  loss = optax.sigmoid_binary_cross_entropy(logits, targets) * mask
  if not balance_groups:
    return jnp.sum(loss) / jnp.sum(mask)
  groups = (slice(0, n_words), slice(n_words, n_words + len(QUALITY_DIMS)), slice(-1, None))
  return sum(jnp.sum(loss[:, g]) / jnp.maximum(jnp.sum(mask[:, g]), 1.0) for g in groups)


def dense_bce(dense_logits, dense_targets):
  """Sigmoid cross-entropy of the per-token words against their soft targets (the share of an
  object in the token): the mean over the entries an object reaches plus the mean over the rest.
  About 1% of the entries are reached; a plain mean teaches a head that says "nothing here"
  everywhere."""
  loss = optax.sigmoid_binary_cross_entropy(dense_logits, dense_targets)
  reached = (dense_targets > 0).astype(loss.dtype)
  on = jnp.sum(loss * reached) / jnp.maximum(jnp.sum(reached), 1.0)
  off = jnp.sum(loss * (1 - reached)) / jnp.maximum(jnp.sum(1 - reached), 1.0)
  return on + off


@dataclasses.dataclass(frozen=True)
class TrainedPerception:
  """The tower with its head (`model`, `params`), the head's columns and the last train loss."""

  model: nn.Module  # PerceptionModel or GroundedPerceptionModel
  params: dict
  names: tuple[str, ...]
  loss: float

  @property
  def words(self) -> tuple[str, ...]:
    return self.names[: -len(QUALITY_DIMS) - 1]

  @property
  def word_embedding(self) -> np.ndarray | None:
    """[n_words, D]: each word's embedding (a grounded head's), else None."""
    return (
      None if 'word_embedding' not in self.params else np.asarray(self.params['word_embedding'])
    )

  @property
  def dense_word_embedding(self) -> tuple[tuple[str, ...], np.ndarray] | None:
    """(caption words, rows [n, D]): the direction in which the per-token head reads each word
    (its kernel's column, D the language model's width), under the caption word that names
    it; a text colour that shares a shape colour's name gives way to it. None without a
    per-token head."""
    if 'dense_head' not in self.params:
      return None
    kernel = np.asarray(self.params['dense_head']['kernel'])
    columns = {}
    for k, word in enumerate(DT.DENSE_WORDS):
      columns.setdefault(DT.caption_word(word), kernel[:, k])
    return tuple(columns), np.stack(list(columns.values()))

  def logits(self, processor, images, batch: int) -> np.ndarray:
    """Head logits [N, K] of uint8 images [N, H, W, 3], `batch` at a time (the last batch
    padded with copies of its first image)."""
    return self.outputs(processor, images, batch)[0]

  def outputs(self, processor, images, batch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(head logits [N, K], per-token logits [N, T, len(DT.DENSE_WORDS)] or None)."""
    layout = batch_layout(self.model.visual, processor, images[0], batch)
    predict = jax.jit(lambda p, x: self.model.apply({'params': p}, x, layout, batch))
    heads, dense = [], []
    for i in range(0, len(images), batch):
      chunk = images[i : i + batch]
      padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])
      logits, per_token = predict(self.params, pixels_of(processor, padded))
      heads.append(np.asarray(logits)[: len(chunk)])
      if per_token is not None:
        dense.append(np.asarray(per_token)[: len(chunk)])
    return np.concatenate(heads), (np.concatenate(dense) if dense else None)


def batch_layout(visual, processor, image, batch: int) -> dict:
  """The tower's layout arrays for `batch` images shaped like `image`."""
  grids = np.repeat(np.asarray(processor([image])['image_grid_thw']), batch, axis=0)
  return {k: jnp.asarray(v) for k, v in vision_layout(grids, visual.config).arrays().items()}


def train_perception(visual, processor, settings, seed: int, size: int, log=print):
  """The trained tower with its head (TrainedPerception; the judge takes `params['visual']`).

  settings: steps, batch_size, lr, n_images, balance_groups, bound_targets, grounded,
  dense_targets, dense_weight (`config.perception`).
  """
  bound = settings.get('bound_targets', False)
  grid = token_grid(visual.config, size) if settings.get('dense_targets', False) else 0
  dense_weight = settings.get('dense_weight', 1.0)
  data = perception_set(seed, settings.n_images, size, bound=bound, dense_grid=grid)
  dense_outputs = len(DT.DENSE_WORDS) if grid else 0
  if settings.get('grounded', False):
    model = GroundedPerceptionModel(
      visual, len(data.words), data.targets.shape[1], dense_outputs=dense_outputs
    )
  else:
    model = PerceptionModel(visual, data.targets.shape[1], dense_outputs=dense_outputs)
  batch = settings.batch_size
  layout = batch_layout(visual, processor, data.images[0], batch)
  pixels = lambda rows: pixels_of(processor, data.images[rows])
  params = nn.meta.unbox(
    model.init(jax.random.key(seed), pixels(np.arange(batch)), layout, batch)['params']
  )
  tx = optax.adamw(
    optax.warmup_cosine_decay_schedule(
      0.0, settings.lr, min(50, settings.steps // 4), settings.steps
    ),
    weight_decay=1e-4,
  )
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, pixel_values, targets, mask, dense):
    def loss_fn(p):
      logits, per_token = model.apply({'params': p}, pixel_values, layout, batch)
      loss = bce(logits, targets, mask, len(data.words), settings.balance_groups)
      if per_token is not None:
        loss += dense_weight * dense_bce(per_token, dense)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = np.random.default_rng([seed, 12])
  loss = float('nan')
  for i in range(settings.steps):
    rows = rng.choice(len(data.images), batch)
    dense = None if data.dense is None else data.dense[rows]
    params, opt, loss = step(params, opt, pixels(rows), data.targets[rows], data.mask[rows], dense)
    if (i + 1) % max(1, settings.steps // 5) == 0 or i + 1 == settings.steps:
      log(f'perception pre-training: step {i + 1}/{settings.steps}, loss {float(loss):.4f}')
  held_out = perception_set(
    seed, settings.n_images // 8 // batch * batch or batch, size, 'val', data.words, bound, grid
  )
  trained = TrainedPerception(model, params, data.names, float(loss))
  held_out_logits, held_out_dense = trained.outputs(processor, held_out.images, batch)
  log(f'perception pre-training: held out {report(held_out, held_out_logits, held_out_dense)}')
  return trained


def token_grid(vision_config, size: int) -> int:
  """Merged image tokens per side of a size x size image."""
  side = vision_config.patch_size * vision_config.spatial_merge_size
  if size % side:
    raise ValueError(f'image size {size} is not a multiple of the merged patch side {side}')
  return size // side


def pixels_of(processor, images):
  return jnp.asarray(processor(list(images))['pixel_values'])


def report(data: PerceptionSet, logits: np.ndarray, dense_logits: np.ndarray | None = None) -> dict:
  """Mean AUC of the word outputs (words on 2-98% of images), the Spearman correlation of
  each oracle-score output with its target, and with per-token targets the mean AUC of the
  per-token words (dense_aucs)."""
  n_words = len(data.words)
  out = {'word_auc': round(float(np.mean(list(word_aucs(data, logits).values()))), 3)}
  if dense_logits is not None and data.dense is not None:
    out['dense_auc'] = round(float(np.mean(list(dense_aucs(data, dense_logits).values()))), 3)
  for k, name in enumerate(data.names[n_words:], n_words):
    rows = data.mask[:, k] > 0
    out[f'{name}_spearman'] = round(
      float(stats.spearmanr(logits[rows, k], data.targets[rows, k])[0]), 3
    )
  return out


def word_aucs(data: PerceptionSet, logits: np.ndarray) -> dict[str, float]:
  """{word: AUC of its output} over the words on 2-98% of the images (rarer or commoner words
  have too few images on one side)."""
  present = data.targets[:, : len(data.words)] > 0
  return {
    word: float(F.auc(logits[present[:, k], k], logits[~present[:, k], k]))
    for k, word in enumerate(data.words)
    if 0.02 < present[:, k].mean() < 0.98
  }


def dense_aucs(data: PerceptionSet, dense_logits: np.ndarray, min_share: float = 0.25) -> dict:
  """{word: AUC of its per-token output} between the tokens holding at least `min_share` of an
  object with that word and the tokens no such object reaches, over words with at least 10
  tokens on each side."""
  targets = data.dense.reshape(-1, data.dense.shape[-1])
  logits = dense_logits.reshape(targets.shape)
  out = {}
  for k, word in enumerate(DT.DENSE_WORDS):
    on, off = targets[:, k] >= min_share, targets[:, k] == 0
    if on.sum() >= 10 and off.sum() >= 10:
      out[word] = float(F.auc(logits[on, k], logits[off, k]))
  return out
