"""Flow-matching sampling schedule, bit-compatible with the Qwen-Image diffusers pipeline.

The Qwen-Image pipelines call `FlowMatchEulerDiscreteScheduler.set_timesteps(
sigmas=np.linspace(1, 1/N, N), mu=calculate_shift(image_seq_len, ...))`. This module
reproduces that in numpy float32 with the same operation order, so sigmas and timesteps match
diffusers exactly (not merely to a tolerance):

  mu     = image_seq_len * m + b,   m = (max_shift - base_shift) / (max_seq - base_seq),
                                    b = base_shift - m * base_seq            (python floats)
  sigma' = e^mu / (e^mu + (1/sigma - 1))          time_shift_type='exponential' (dynamic)
         = mu / (mu + (1/sigma - 1))              time_shift_type='linear'      (dynamic)
         = shift*sigma / (1 + (shift-1)*sigma)    use_dynamic_shifting=False
  if shift_terminal: sigma'' = 1 - (1 - sigma') / ((1 - sigma'_last) / (1 - shift_terminal))
  timesteps = sigma'' * 1000; a final sigma of 0 is appended.

The image sequence length is the number of packed target latent tokens, (H // 16) * (W // 16)
for Qwen-Image (8x VAE, 2x2 patches); see `packed_image_seq_len`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

# Keys of a diffusers scheduler_config.json that we read, with diffusers' class defaults (which
# are also the pipeline's `config.get(...)` fallbacks).
_DEFAULTS = dict(
  num_train_timesteps=1000,
  shift=1.0,
  use_dynamic_shifting=False,
  base_shift=0.5,
  max_shift=1.15,
  base_image_seq_len=256,
  max_image_seq_len=4096,
  shift_terminal=None,
  time_shift_type="exponential",
)
# Scheduler options we do not implement; a config that turns one on is rejected, not ignored.
_UNSUPPORTED_TRUE_FLAGS = (
  "invert_sigmas",
  "use_karras_sigmas",
  "use_exponential_sigmas",
  "use_beta_sigmas",
  "stochastic_sampling",
)
# Bookkeeping keys that carry no schedule information.
_IGNORED_KEYS = ("_class_name", "_diffusers_version")


def packed_image_seq_len(
  height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2
) -> int:
  """Number of packed latent tokens for an image, as the pipeline's `latents.shape[1]`."""
  step = vae_scale_factor * patch_size
  return (height // step) * (width // step)


@dataclasses.dataclass(frozen=True)
class FlowMatchSchedule:
  """The sigma/timestep schedule of `FlowMatchEulerDiscreteScheduler` as used by Qwen-Image."""

  num_train_timesteps: int = 1000
  shift: float = 1.0
  use_dynamic_shifting: bool = False
  base_shift: float | None = 0.5
  max_shift: float | None = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096
  shift_terminal: float | None = None
  time_shift_type: str = "exponential"

  def __post_init__(self):
    if self.time_shift_type not in ("exponential", "linear"):
      raise ValueError(
        f"scheduler time_shift_type={self.time_shift_type!r}: must be 'exponential' or 'linear'."
      )
    if self.shift_terminal is not None and not 0.0 <= self.shift_terminal < 1.0:
      raise ValueError(
        f"scheduler shift_terminal={self.shift_terminal}: must be in [0, 1) or None."
      )
    if self.use_dynamic_shifting:
      if self.base_shift is None or self.max_shift is None:
        raise ValueError(
          "scheduler use_dynamic_shifting=True needs base_shift and max_shift (got None)."
        )
      if self.max_image_seq_len == self.base_image_seq_len:
        raise ValueError("scheduler max_image_seq_len must differ from base_image_seq_len.")

  # --- construction -------------------------------------------------------------------------

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> FlowMatchSchedule:
    """From a diffusers scheduler_config.json dict; missing keys take diffusers' defaults."""
    for flag in _UNSUPPORTED_TRUE_FLAGS:
      if config.get(flag):
        raise ValueError(
          f"scheduler config sets {flag}=True, which FlowMatchSchedule does not support."
        )
    class_name = config.get("_class_name")
    if class_name not in (None, "FlowMatchEulerDiscreteScheduler"):
      raise ValueError(
        f"scheduler config _class_name={class_name!r}: "
        f"only FlowMatchEulerDiscreteScheduler is supported."
      )
    kwargs = {k: config.get(k, default) for k, default in _DEFAULTS.items()}
    return cls(**kwargs)

  @classmethod
  def from_json(cls, path: str) -> FlowMatchSchedule:
    """From a scheduler_config.json, a `scheduler/` folder, or a diffusers model root folder."""
    candidates = [
      path,
      os.path.join(path, "scheduler_config.json"),
      os.path.join(path, "scheduler", "scheduler_config.json"),
    ]
    for candidate in candidates:
      if os.path.isfile(candidate):
        with open(candidate) as f:
          return cls.from_config(json.load(f))
    raise FileNotFoundError(f"No scheduler_config.json at or under {path!r} (tried {candidates}).")

  # --- schedule -----------------------------------------------------------------------------

  def mu(self, image_seq_len: int) -> float:
    """`calculate_shift` of the Qwen-Image pipeline (python float arithmetic, same order)."""
    m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
    b = self.base_shift - m * self.base_image_seq_len
    return image_seq_len * m + b

  def time_shift_factor(self, image_seq_len: int | None = None) -> float:
    """s such that the shift maps sigma to s sigma / (1 + (s - 1) sigma) (before shift_terminal):
    e^mu (exponential), mu (linear) or `shift` (static)."""
    if not self.use_dynamic_shifting:
      return float(self.shift)
    if image_seq_len is None:
      raise ValueError("use_dynamic_shifting=True: time_shift_factor() needs image_seq_len.")
    mu = self.mu(image_seq_len)
    return math.exp(mu) if self.time_shift_type == "exponential" else mu

  def sigmas(self, num_steps: int, image_seq_len: int | None = None) -> np.ndarray:
    """Float32 sigmas [num_steps + 1], decreasing from 1 to the last step, then a final 0."""
    if num_steps < 1:
      raise ValueError(f"num_steps={num_steps}: must be >= 1.")
    if self.shift_terminal and num_steps < 2:
      # diffusers divides 0 by 0 here and returns NaN sigmas.
      raise ValueError(f"num_steps={num_steps}: shift_terminal needs at least 2 steps.")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    # numpy >= 2 promotion: python scalars are cast to float32 at each op, as in diffusers.
    if self.use_dynamic_shifting:
      if image_seq_len is None:
        raise ValueError("use_dynamic_shifting=True: sigmas() needs image_seq_len.")
      mu = self.mu(image_seq_len)
      if self.time_shift_type == "exponential":
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
      else:
        sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
      sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
    if self.shift_terminal:
      one_minus = 1 - sigmas
      scale = one_minus[-1] / (1 - self.shift_terminal)
      sigmas = 1 - (one_minus / scale)
    sigmas = np.asarray(sigmas, dtype=np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])

  def timesteps(self, num_steps: int, image_seq_len: int | None = None) -> np.ndarray:
    """Float32 timesteps [num_steps] = sigmas * num_train_timesteps (the model input / 1000)."""
    return self.sigmas(num_steps, image_seq_len)[:-1] * np.float32(self.num_train_timesteps)


def euler_step(x, v, sigma, sigma_next):
  """One flow-matching Euler step x + (sigma_next - sigma) * v, in float32.

  `sigma`/`sigma_next` are scalars or per-sample [B]. Like the scheduler's `step`, the update is
  computed in float32; the result stays float32 (cast it to the model dtype where wanted).
  """
  x = jnp.asarray(x, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  dt = per_sample_time(sigma_next, x.ndim) - per_sample_time(sigma, x.ndim)
  return x + dt * v


def per_sample_time(t, ndim: int):
  """A scalar or [B] time as float32 broadcastable against a [B, ...] array of rank `ndim`."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return t
  if t.ndim != 1:
    raise ValueError(f"time must be a scalar or [batch], got shape {t.shape}.")
  return t.reshape((-1,) + (1,) * (ndim - 1))
