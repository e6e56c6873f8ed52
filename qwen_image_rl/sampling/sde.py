"""The Flow-GRPO SDE step with Gaussian log-probabilities, in float32.

Flow matching uses x_t = (1 - t) x0 + t eps and velocity v = eps - x0; sampling integrates
dx/dt = v from t = 1 to t = 0. Flow-GRPO (and Qwen-Image-2.0-RL, Eq. 4) replace the ODE by an SDE
with the same marginals,

  dx = [v + sigma_t^2 / (2t) * (x + (1 - t) v)] dt + sigma_t dw,

and take one Euler-Maruyama step from t to t_next < t, with Delta = t - t_next > 0:

  mean = x * (1 - sigma_t^2 Delta / (2t)) - v * Delta * (1 + sigma_t^2 (1 - t) / (2t))
  std  = sigma_t * sqrt(Delta)
  x_next = mean + std * xi,   xi ~ N(0, I).

Noise schedule (yifan123/flow_grpo, `sd3_sde_with_logprob.py`):

  sigma_t = a * sqrt(t / (1 - t')),   t' = sigma_max_t if t == 1 else t,

where a is `noise_level` and flow_grpo's sigma_max_t is `scheduler.sigmas[1]`, the second sigma
of the schedule. Because t == 1 only at the first step, whose t_next *is* sigmas[1], passing
`sigma_max_t=None` here uses t_next in its place, which gives flow_grpo's value exactly. We test
`t >= 1` rather than `t == 1` so a schedule that starts a rounding error above 1 behaves the same.

Coefficients-Preserving Sampling (CPS, arXiv 2509.05952), `sde_type='cps'`: from the model's
predictions x0_hat = x - t v and eps_hat = x + (1 - t) v,

  x_next = (1 - t') x0_hat + sqrt(t'^2 - s^2) eps_hat + s xi,   s = t' sin(a pi / 2),

a Gaussian with mean (1 - t') x0_hat + sqrt(t'^2 - s^2) eps_hat and std s (t' = t_next, a the
noise level in [0, 1]). The noise coefficient stays t' (sqrt(t'^2 - s^2)^2 + s^2 = t'^2), so no
step adds variance beyond the marginal's, unlike the SDE above at few steps. At t' = 0 the std
is 0 and the step is deterministic: train only steps with t' > 0.

Log-probabilities are per element Gaussian densities *averaged* (not summed) over all non-batch
dimensions, as flow_grpo does; they are per-sample [B].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qwen_image_rl.sampling.schedule import per_sample_time

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def sde_sigma(t, t_next, noise_level, sigma_max_t=None):
  """Flow-GRPO's sigma_t = a * sqrt(t / (1 - t')), t' = sigma_max_t (default t_next) at t = 1."""
  t = jnp.asarray(t, jnp.float32)
  replacement = t_next if sigma_max_t is None else sigma_max_t
  replacement = jnp.asarray(replacement, jnp.float32)
  denominator_t = jnp.where(t >= 1.0, replacement, t)
  return noise_level * jnp.sqrt(t / (1.0 - denominator_t))


def sde_step_mean_std(x, v, t, t_next, noise_level, sigma_max_t=None):
  """Mean and std of the Gaussian transition x_t -> x_{t_next}.

  Args:
    x: current latents [B, ...].
    v: predicted velocity, same shape.
    t, t_next: current and next sigma (t > t_next >= 0), scalars or per-sample [B].
    noise_level: a in sigma_t = a * sqrt(t / (1 - t)); 0 gives the Euler ODE step.
    sigma_max_t: the value replacing t in the denominator at t = 1 (flow_grpo: sigmas[1]);
      None uses t_next, identical to flow_grpo (see the module docstring).

  Returns:
    (mean [B, ...] float32, std float32 broadcastable to x: [B, 1, ...] or a scalar).
  """
  x = jnp.asarray(x, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  t_b = per_sample_time(t, x.ndim)
  t_next_b = per_sample_time(t_next, x.ndim)
  sigma_max_b = None if sigma_max_t is None else per_sample_time(sigma_max_t, x.ndim)
  sigma = sde_sigma(t_b, t_next_b, noise_level, sigma_max_b)
  delta = t_b - t_next_b
  sigma_sq = sigma * sigma
  mean = x * (1.0 - sigma_sq * delta / (2.0 * t_b)) - v * delta * (
    1.0 + sigma_sq * (1.0 - t_b) / (2.0 * t_b)
  )
  std = sigma * jnp.sqrt(delta)
  return mean, std


SDE_TYPES = ("flow_grpo", "cps")


def cps_step_mean_std(x, v, t, t_next, noise_level):
  """Mean and std of the CPS transition x_t -> x_{t_next} (see the module docstring).

  noise_level is a in s = t_next sin(a pi / 2), in [0, 1]. Returns (mean [B, ...] float32,
  std [B, 1, ...] float32).
  """
  x = jnp.asarray(x, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  t_b = per_sample_time(t, x.ndim)
  t_next_b = per_sample_time(t_next, x.ndim)
  std = t_next_b * jnp.sin(noise_level * (math.pi / 2.0))
  x0_hat = x - t_b * v
  eps_hat = x + (1.0 - t_b) * v
  mean = (1.0 - t_next_b) * x0_hat + jnp.sqrt(jnp.maximum(t_next_b**2 - std**2, 0.0)) * eps_hat
  return mean, std


def step_mean_std(sde_type: str, x, v, t, t_next, noise_level):
  """The stochastic step's (mean, std) of `sde_type` ('flow_grpo' | 'cps')."""
  if sde_type == "flow_grpo":
    return sde_step_mean_std(x, v, t, t_next, noise_level)
  if sde_type == "cps":
    return cps_step_mean_std(x, v, t, t_next, noise_level)
  raise ValueError(f"sde_type={sde_type!r}: expected one of {SDE_TYPES}.")


def sde_sample(mean, std, key):
  """x_next = mean + std * xi with xi ~ N(0, I) drawn in float32 from `key`."""
  mean = jnp.asarray(mean, jnp.float32)
  noise = jax.random.normal(key, mean.shape, jnp.float32)
  return mean + jnp.asarray(std, jnp.float32) * noise


def _mean_over_non_batch(values):
  return jnp.mean(values, axis=tuple(range(1, values.ndim)))


def gaussian_log_prob(x_next, mean, std):
  """Per-sample [B] log N(x_next; mean, std^2), averaged over all non-batch dimensions."""
  x_next = jnp.asarray(x_next, jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  log_density = -((x_next - mean) ** 2) / (2.0 * std * std) - jnp.log(std) - _HALF_LOG_2PI
  log_density = jnp.broadcast_to(log_density, jnp.broadcast_shapes(x_next.shape, mean.shape))
  return _mean_over_non_batch(log_density)


def sde_step(x, v, t, t_next, noise_level, key, sigma_max_t=None):
  """One SDE step: returns (x_next, log_prob [B], mean, std), all float32."""
  mean, std = sde_step_mean_std(x, v, t, t_next, noise_level, sigma_max_t)
  x_next = sde_sample(mean, std, key)
  return x_next, gaussian_log_prob(x_next, mean, std), mean, std


def kl_closed_form(mean_a, mean_b, std):
  """Per-sample [B] ||mean_a - mean_b||^2 / (2 std^2), averaged over non-batch dims.

  With `std` the per-step std from `sde_step_mean_std` (sigma_t * sqrt(Delta)) this is the exact
  KL between the two transition Gaussians, averaged per element like the log-prob. flow_grpo's
  KL loss passes sigma_t alone (without sqrt(Delta)), i.e. Delta times this value.
  """
  mean_a = jnp.asarray(mean_a, jnp.float32)
  mean_b = jnp.asarray(mean_b, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  kl = (mean_a - mean_b) ** 2 / (2.0 * std * std)
  kl = jnp.broadcast_to(kl, jnp.broadcast_shapes(mean_a.shape, mean_b.shape))
  return _mean_over_non_batch(kl)
