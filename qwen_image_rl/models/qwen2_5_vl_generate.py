"""Qwen2.5-VL text generation and scoring with a static KV cache, in one jitted loop.

Prompts are left-padded [B, L] (attention_mask 0 on the padding). The cache has L + max_new
slots; the prompt fills slots 0..L-1 in one prefill pass, generated token i sits in slot L + i.
Positions follow transformers' `generate`: the prompt's mRoPE positions from `rope_index`
(text-only: cumsum(mask) - 1, padding 0), and each new token one past the previous one on all
three streams. Greedy decoding takes the argmax; sampling divides the logits by the
temperature, keeps the smallest set of tokens whose probability reaches top_p (transformers'
TopPLogitsWarper) and draws from it. A sample stops after emitting a stop token; later slots
hold `pad_token_id`. The loop exits early once every sample has stopped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.models.qwen2_5_vl import init_kv_cache
from qwen_image_rl.models.qwen2_5_vl_full import Qwen25VL


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """max_new_tokens; temperature 0 = greedy; top_p in (0, 1]; stop_token_ids end a sample."""

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_p: float = 1.0
  stop_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
  """Logits with everything outside the top-p nucleus set to -inf (the top token always kept)."""
  if top_p >= 1.0:
    return logits
  sorted_logits = jnp.sort(logits, axis=-1)  # ascending, as transformers
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  remove = cumulative <= 1.0 - top_p
  remove = remove.at[..., -1].set(False)
  # Threshold: the smallest kept logit; ties at the threshold are kept.
  threshold = jnp.min(jnp.where(remove, jnp.inf, sorted_logits), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def next_token(logits: jax.Array, rng, config: GenerationConfig) -> jax.Array:
  """[B, V] float logits -> [B] int32 tokens."""
  logits = logits.astype(jnp.float32)
  if config.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = top_p_filter(logits / config.temperature, config.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _generate(
  model: Qwen25VL,
  params,
  input_ids,
  attention_mask,
  position_ids,
  rng,
  pixel_values,
  vision_layout,
  *,
  config: GenerationConfig,
):
  batch, length = input_ids.shape
  steps = config.max_new_tokens
  cache = init_kv_cache(model.language_model, batch, length + steps)
  key_mask = jnp.concatenate(
    [attention_mask.astype(jnp.int32), jnp.ones((batch, steps), jnp.int32)], axis=1
  )
  apply = functools.partial(model.apply, {"params": params}, attention_mask=key_mask)
  last = jnp.full((batch, 1), length - 1, jnp.int32)
  logits, cache = apply(
    input_ids,
    pixel_values=pixel_values,
    vision_layout=vision_layout,
    position_ids=position_ids,
    kv_cache=cache,
    cache_index=0,
    output_positions=last,
  )
  next_position = position_ids[:, :, -1] + 1  # [3, B]
  stop = jnp.asarray(config.stop_token_ids or (-1,), jnp.int32)

  def emit(state, logits):
    step, rng, done, tokens = state["step"], state["rng"], state["done"], state["tokens"]
    rng, key = jax.random.split(rng)
    token = next_token(logits[:, -1], key, config)
    token = jnp.where(done, config.pad_token_id, token)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
    done = done | jnp.isin(token, stop)
    return dict(state, step=step + 1, rng=rng, done=done, tokens=tokens, last=token)

  def body(state):
    step = state["step"]
    positions = (next_position + step - 1)[:, :, None]
    logits, cache = apply(
      state["last"][:, None],
      position_ids=positions,
      kv_cache=state["cache"],
      cache_index=length + step - 1,
    )
    return emit(dict(state, cache=cache), logits)

  state = dict(
    step=jnp.int32(0),
    rng=rng,
    done=jnp.zeros((batch,), bool),
    tokens=jnp.full((batch, steps), config.pad_token_id, jnp.int32),
    last=jnp.zeros((batch,), jnp.int32),
    cache=cache,
  )
  state = emit(state, logits)
  state = jax.lax.while_loop(lambda s: (s["step"] < steps) & ~jnp.all(s["done"]), body, state)
  return state["tokens"]


def generate(
  model: Qwen25VL,
  params,
  input_ids,
  attention_mask=None,
  *,
  pixel_values=None,
  image_grid_thw=None,
  config: GenerationConfig = GenerationConfig(),
  rng=None,
):
  """New tokens [B, max_new_tokens] (int32) for left-padded prompts [B, L].

  Image prompts: pixel_values / image_grid_thw from `ImageProcessor`, `<|image_pad|>` tokens
  expanded in input_ids. rng: a PRNG key for sampling (default key 0).
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids shape {ids.shape}: expected [B, L]")
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if not mask[:, -1].all():
    raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be all 1")
  grid = None if pixel_values is None else image_grid_thw
  positions, _ = model.rope_index(ids, mask, grid)
  layout = (
    None
    if pixel_values is None
    else {k: jnp.asarray(v) for k, v in model.layout(image_grid_thw).items()}
  )
  if pixel_values is not None:
    pixel_values = jnp.asarray(pixel_values)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(
    model,
    params,
    jnp.asarray(ids, jnp.int32),
    jnp.asarray(mask, jnp.int32),
    jnp.asarray(positions),
    rng,
    pixel_values,
    layout,
    config=config,
  )


@functools.partial(jax.jit, static_argnames=("model",))
def _score(
  model, params, input_ids, attention_mask, position_ids, positions, pixel_values, vision_layout
):
  return model.apply(
    {"params": params},
    input_ids,
    attention_mask,
    pixel_values,
    position_ids=position_ids,
    vision_layout=vision_layout,
    output_positions=positions,
  )


def score(
  model: Qwen25VL,
  params,
  input_ids,
  positions: Sequence | np.ndarray,
  attention_mask=None,
  *,
  pixel_values=None,
  image_grid_thw=None,
):
  """Logits [B, K, V] at `positions` [B, K] of one forward pass (no generation).

  Positions as transformers' forward: mRoPE from `rope_index` with images, arange(L) without.
  """
  ids = np.asarray(input_ids)
  positions = np.asarray(positions, np.int32)
  if positions.ndim != 2 or positions.shape[0] != ids.shape[0]:
    raise ValueError(f"positions shape {positions.shape}: expected [B={ids.shape[0]}, K]")
  if positions.size and (positions.min() < 0 or positions.max() >= ids.shape[1]):
    raise ValueError(f"positions must lie in [0, {ids.shape[1]})")
  mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  position_ids, layout = None, None
  if pixel_values is not None:
    position_ids = jnp.asarray(model.rope_index(ids, attention_mask, image_grid_thw)[0])
    layout = {k: jnp.asarray(v) for k, v in model.layout(image_grid_thw).items()}
    pixel_values = jnp.asarray(pixel_values)
  return _score(
    model,
    params,
    jnp.asarray(ids, jnp.int32),
    mask,
    position_ids,
    jnp.asarray(positions),
    pixel_values,
    layout,
  )
