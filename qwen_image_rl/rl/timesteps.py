"""Which denoising steps GRPO trains on.

Training on all rollout steps leads to fast reward hacking (Qwen-Image-2.0-RL section 3); the fix
is a subset that favours high-noise steps (t near 1, small step indices). Strategies, all returning
K distinct step indices in [0, N) sorted ascending (int32 [K], static K) and a bool mask [N]:

  'all'        every step; K must equal N.
  'uniform'    K distinct steps uniformly from all N (DanceGRPO's timestep_fraction).
  'high_noise' K distinct steps from the first M, drawn without replacement with probability
               proportional to sigma_i ** power (TempFlow-GRPO-like weighting toward t = 1);
               power = 0 is uniform over the first M.
  'window'     K consecutive steps starting at `window_start` (Flow-GRPO-Fast's SDE window);
               the window must lie in the first M steps.
  'sliding'    like 'window', but the start advances by `slide_stride` every `slide_every`
               training steps and wraps within the first M steps (MixGRPO-style).

Draws without replacement use the Gumbel-top-k trick, which matches sequential weighted sampling
without replacement and is deterministic given the jax key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("all", "uniform", "high_noise", "window", "sliding")


def validate_timestep_config(
  strategy: str,
  num_train: int | None,
  first_m: int | None,
  num_steps: int,
  *,
  window_start: int = 0,
  slide_every: int = 1,
  where: str = "rl.timesteps",
) -> None:
  """Raises ValueError naming the offending field. K = num_train, M = first_m, N = num_steps."""
  if strategy not in STRATEGIES:
    raise ValueError(f"{where}.strategy={strategy!r} is unknown; choose one of {STRATEGIES}.")
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps (N) = {num_steps!r}: must be a positive integer.")
  if num_train is None or not isinstance(num_train, (int, np.integer)) or num_train < 1:
    raise ValueError(f"{where}.num_train (K) = {num_train!r}: must be a positive integer.")
  if num_train > num_steps:
    raise ValueError(
      f"{where}.num_train (K={num_train}) > num_steps (N={num_steps}): "
      "cannot train on more steps than the rollout has."
    )
  if strategy == "all" and num_train != num_steps:
    raise ValueError(
      f"{where}.num_train (K={num_train}) must equal num_steps (N={num_steps}) for strategy 'all'."
    )
  if first_m is not None:
    if not isinstance(first_m, (int, np.integer)) or first_m < 1:
      raise ValueError(f"{where}.first_m (M) = {first_m!r}: must be a positive integer or None.")
    if first_m > num_steps:
      raise ValueError(f"{where}.first_m (M={first_m}) > num_steps (N={num_steps}).")
    if num_train > first_m:
      raise ValueError(
        f"{where}.num_train (K={num_train}) > first_m (M={first_m}): "
        "cannot pick K distinct steps from the first M."
      )
  if strategy in ("window", "sliding"):
    region = num_steps if first_m is None else first_m
    if window_start < 0 or window_start + num_train > region:
      raise ValueError(
        f"{where}.window_start={window_start}: the window [start, start+K) = "
        f"[{window_start}, {window_start + num_train}) must lie in the first "
        f"{region} steps (first_m, or num_steps when first_m is None)."
      )
  if strategy == "sliding" and slide_every < 1:
    raise ValueError(f"{where}.slide_every={slide_every}: must be >= 1.")


def high_noise_probs(num_steps: int, first_m: int, power: float, sigmas=None) -> np.ndarray:
  """Probabilities [N] of each step for the first 'high_noise' draw (zero past the first M).

  `sigmas` is the rollout schedule's [N] (or [N+1]) sigmas; None uses linspace(1, 1/N, N).
  """
  return np.asarray(jax.nn.softmax(_high_noise_logits(num_steps, first_m, power, sigmas)))


def _high_noise_logits(num_steps, first_m, power, sigmas):
  if sigmas is None:
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
  sigmas = jnp.asarray(sigmas, jnp.float32)[:num_steps]
  logits = power * jnp.log(sigmas)
  return jnp.where(jnp.arange(num_steps) < first_m, logits, -jnp.inf)


def _top_k_without_replacement(key, logits, k: int):
  """K distinct indices, each draw proportional to exp(logits) among those left (Gumbel-top-k)."""
  perturbed = logits + jax.random.gumbel(key, logits.shape, jnp.float32)
  _, indices = jax.lax.top_k(perturbed, k)
  return indices


def select_timesteps(
  key,
  strategy: str,
  num_steps: int,
  num_train: int,
  first_m: int | None = None,
  *,
  power: float = 1.0,
  sigmas=None,
  window_start: int = 0,
  train_step=0,
  slide_every: int = 1,
  slide_stride: int = 1,
):
  """Step indices to train on: (int32 [K] sorted ascending, bool mask [N]).

  `strategy`, `num_steps`, `num_train`, `first_m` and the window settings are static; `key`,
  `sigmas` and `train_step` may be traced. Call `validate_timestep_config` once on the host first.
  """
  validate_timestep_config(
    strategy, num_train, first_m, num_steps, window_start=window_start, slide_every=slide_every
  )
  region = num_steps if first_m is None else first_m
  if strategy == "all":
    indices = jnp.arange(num_steps, dtype=jnp.int32)
  elif strategy == "uniform":
    indices = _top_k_without_replacement(key, jnp.zeros((num_steps,), jnp.float32), num_train)
  elif strategy == "high_noise":
    logits = _high_noise_logits(num_steps, region, power, sigmas)
    indices = _top_k_without_replacement(key, logits, num_train)
  elif strategy == "window":
    indices = window_start + jnp.arange(num_train, dtype=jnp.int32)
  else:  # sliding
    num_starts = region - num_train + 1
    advanced = window_start + (jnp.asarray(train_step, jnp.int32) // slide_every) * slide_stride
    indices = advanced % num_starts + jnp.arange(num_train, dtype=jnp.int32)
  indices = jnp.sort(indices.astype(jnp.int32))
  mask = jnp.zeros((num_steps,), bool).at[indices].set(True)
  return indices, mask
