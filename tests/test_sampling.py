"""Sampling math: schedule parity with diffusers, true CFG, and the Flow-GRPO SDE step."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_image_rl.sampling import guidance, schedule, sde

QWEN_IMAGE_HUB = dict(
  use_dynamic_shifting=True,
  base_shift=0.5,
  max_shift=0.9,
  base_image_seq_len=256,
  max_image_seq_len=8192,
  shift_terminal=0.02,
  time_shift_type="exponential",
)
SCHEDULER_CONFIGS = {
  "qwen_image_hub": QWEN_IMAGE_HUB,
  "class_defaults": {},
  "static_shift3": dict(shift=3.0),
  "hub_linear": dict(QWEN_IMAGE_HUB, time_shift_type="linear"),
}


# --- schedule ------------------------------------------------------------------------------------


def _diffusers_sigmas_timesteps(config, num_steps, image_seq_len):
  """What QwenImagePipeline.__call__ does to build its schedule."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

  scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
  mu = calculate_shift(
    image_seq_len,
    scheduler.config.get("base_image_seq_len", 256),
    scheduler.config.get("max_image_seq_len", 4096),
    scheduler.config.get("base_shift", 0.5),
    scheduler.config.get("max_shift", 1.15),
  )
  sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
  timesteps, _ = retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
  return scheduler, scheduler.sigmas.numpy(), timesteps.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(SCHEDULER_CONFIGS))
def test_schedule_matches_diffusers(name):
  config = SCHEDULER_CONFIGS[name]
  ours = schedule.FlowMatchSchedule.from_config(config)
  worst = 0.0
  for image_seq_len in (16, 256, 1024, 4096, 6000, 10000):
    for num_steps in (2, 3, 10, 40, 50):
      _, ref_sigmas, ref_timesteps = _diffusers_sigmas_timesteps(config, num_steps, image_seq_len)
      sigmas = ours.sigmas(num_steps, image_seq_len)
      timesteps = ours.timesteps(num_steps, image_seq_len)
      assert sigmas.dtype == np.float32 and sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0
      assert timesteps.shape == (num_steps,)
      worst = max(
        worst, np.abs(sigmas - ref_sigmas).max(), np.abs(timesteps - ref_timesteps).max() / 1000
      )
  assert worst <= 1e-6, worst  # measured: 0.0 (bit-identical) for every config


def test_schedule_hub_values_and_fallbacks():
  hub = schedule.FlowMatchSchedule.from_config(
    dict(QWEN_IMAGE_HUB, _class_name="FlowMatchEulerDiscreteScheduler")
  )
  assert hub.mu(schedule.packed_image_seq_len(1024, 1024)) == pytest.approx(0.693548, abs=1e-6)
  timesteps = hub.timesteps(50, 4096)
  np.testing.assert_allclose(
    timesteps[[0, 1, 2, -2, -1]], [1000, 989.70, 979.19, 58.48, 20.0], atol=6e-3
  )
  defaults = schedule.FlowMatchSchedule.from_config({})
  assert defaults == schedule.FlowMatchSchedule()
  assert (
    defaults.base_image_seq_len,
    defaults.max_image_seq_len,
    defaults.base_shift,
    defaults.max_shift,
    defaults.shift,
    defaults.use_dynamic_shifting,
    defaults.shift_terminal,
    defaults.time_shift_type,
  ) == (256, 4096, 0.5, 1.15, 1.0, False, None, "exponential")
  with pytest.raises(ValueError, match="use_karras_sigmas"):
    schedule.FlowMatchSchedule.from_config({"use_karras_sigmas": True})
  with pytest.raises(ValueError, match="time_shift_type"):
    schedule.FlowMatchSchedule.from_config({"time_shift_type": "cosine"})
  with pytest.raises(ValueError, match="image_seq_len"):
    hub.sigmas(10)
  with pytest.raises(ValueError, match="at least 2 steps"):
    hub.sigmas(1, 4096)


def test_schedule_from_json(tmp_path):
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(QWEN_IMAGE_HUB))
  loaded = schedule.FlowMatchSchedule.from_json(str(tmp_path))
  assert loaded == schedule.FlowMatchSchedule.from_config(QWEN_IMAGE_HUB)
  with pytest.raises(FileNotFoundError):
    schedule.FlowMatchSchedule.from_json(str(tmp_path / "nope"))


@pytest.mark.torch
@pytest.mark.parametrize(
  "config",
  [
    dict(
      use_dynamic_shifting=True,
      base_shift=0.5,
      max_shift=0.9,
      max_image_seq_len=8192,
      time_shift_type="exponential",
    ),
    dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="linear"),
    dict(shift=3.0),
  ],
)
def test_time_shift_factor_reproduces_the_sigmas(config):
  """The sft trainer shifts training times by this factor to train where the sampler samples."""
  sched = schedule.FlowMatchSchedule.from_config(config)
  s = sched.time_shift_factor(64)
  base = np.linspace(1.0, 1 / 10, 10)
  np.testing.assert_allclose(s * base / (1 + (s - 1) * base), sched.sigmas(10, 64)[:-1], rtol=1e-6)
  if sched.use_dynamic_shifting:
    with pytest.raises(ValueError, match="needs image_seq_len"):
      sched.time_shift_factor()


def test_euler_step_matches_scheduler_step():
  import torch

  scheduler, ref_sigmas, ref_timesteps = _diffusers_sigmas_timesteps(QWEN_IMAGE_HUB, 6, 64)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 64, 64)).astype(np.float32)
  ours = x
  for i, t in enumerate(ref_timesteps):
    v = rng.standard_normal(x.shape).astype(np.float32)
    x = scheduler.step(
      torch.from_numpy(v), torch.tensor(t), torch.from_numpy(x), return_dict=False
    )[0].numpy()
    ours = schedule.euler_step(ours, v, ref_sigmas[i], ref_sigmas[i + 1])
  assert np.abs(np.asarray(ours) - x).max() <= 1e-6  # measured 0.0
  # Per-sample sigmas broadcast over the batch.
  per_sample = schedule.euler_step(x, x, jnp.array([1.0, 0.5]), jnp.array([0.5, 0.0]))
  np.testing.assert_allclose(per_sample, np.stack([x[0] * 0.5, x[1] * 0.5]), rtol=1e-6)


# --- true CFG ------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("scale", [1.0, 4.0, 7.5])
def test_true_cfg_matches_diffusers_expression(scale):
  import torch

  rng = np.random.default_rng(1)
  cond = rng.standard_normal((2, 48, 64)).astype(np.float32)
  uncond = rng.standard_normal((2, 48, 64)).astype(np.float32)
  noise_pred, neg_noise_pred = torch.from_numpy(cond), torch.from_numpy(uncond)
  # Verbatim from QwenImagePipeline.__call__.
  comb_pred = neg_noise_pred + scale * (noise_pred - neg_noise_pred)
  cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
  noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
  expected = (comb_pred * (cond_norm / noise_norm)).numpy()
  ours = np.asarray(jax.jit(guidance.true_cfg)(cond, uncond, scale))
  assert ours.dtype == np.float32
  assert np.abs(ours - expected).max() <= 2e-6  # measured ~5e-7
  np.testing.assert_allclose(
    np.linalg.norm(ours, axis=-1), np.linalg.norm(cond, axis=-1), rtol=1e-5
  )


# --- SDE -----------------------------------------------------------------------------------------


def _np_sde(x, v, t, t_next, a, sigma_max_t):
  """Independent float64 numpy version of the Flow-GRPO step equations."""
  x, v = x.astype(np.float64), v.astype(np.float64)
  t = np.asarray(t, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
  t_next = np.asarray(t_next, np.float64).reshape(t.shape)
  denominator = np.where(t == 1.0, sigma_max_t, t)
  sigma = a * np.sqrt(t / (1.0 - denominator))
  delta = t - t_next
  mean = x * (1 - sigma**2 * delta / (2 * t)) - v * delta * (1 + sigma**2 * (1 - t) / (2 * t))
  return mean, sigma * np.sqrt(delta)


def _np_log_prob(x_next, mean, std):
  density = np.exp(-((x_next - mean) ** 2) / (2 * std**2)) / (std * np.sqrt(2 * np.pi))
  return np.log(density).reshape(x_next.shape[0], -1).mean(axis=1)


def test_sde_step_matches_numpy():
  sigmas = schedule.FlowMatchSchedule.from_config(QWEN_IMAGE_HUB).sigmas(10, 1024)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 16, 8)).astype(np.float32)
  v = rng.standard_normal((3, 16, 8)).astype(np.float32)
  step = jax.jit(sde.sde_step)
  worst_mean = worst_lp = 0.0
  for i in range(10):  # includes t = 1 (sigma_max replacement) and the last step to t_next = 0
    for a in (0.7, 1.2):
      t = np.full((3,), sigmas[i], np.float32)
      t_next = np.full((3,), sigmas[i + 1], np.float32)
      ref_mean, ref_std = _np_sde(x, v, t, t_next, a, sigma_max_t=np.float64(sigmas[1]))
      x_next, log_prob, mean, std = step(x, v, t, t_next, a, jax.random.key(i))
      # Explicit sigma_max_t and scalar times give the same numbers.
      mean2, std2 = sde.sde_step_mean_std(x, v, sigmas[i], sigmas[i + 1], a, sigma_max_t=sigmas[1])
      np.testing.assert_allclose(mean2, mean, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(np.broadcast_to(std2, std.shape), std, rtol=1e-6)
      # Relative to the step's scale: elementwise relative error is meaningless near mean = 0.
      worst_mean = max(
        worst_mean,
        np.max(np.abs(mean - ref_mean)) / np.max(np.abs(ref_mean)),
        np.max(np.abs(std - ref_std) / ref_std),
      )
      ref_lp = _np_log_prob(np.asarray(x_next, np.float64), ref_mean, ref_std)
      worst_lp = max(worst_lp, np.max(np.abs(log_prob - ref_lp) / (np.abs(ref_lp) + 1)))
      assert x_next.dtype == log_prob.dtype == jnp.float32 and log_prob.shape == (3,)
  assert worst_mean <= 1e-5, worst_mean  # measured ~2e-7
  assert worst_lp <= 1e-5, worst_lp  # measured ~1e-7


def test_sde_zero_noise_is_euler_and_mean_follows_drift():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 32)).astype(np.float32)
  v = rng.standard_normal((2, 32)).astype(np.float32)
  mean, std = sde.sde_step_mean_std(x, v, 0.8, 0.75, 0.0)
  np.testing.assert_allclose(mean, schedule.euler_step(x, v, 0.8, 0.75), rtol=0, atol=1e-7)
  assert float(np.max(std)) == 0.0
  # The mean is x + drift * dt with the continuous SDE drift evaluated at t (first-order scheme).
  t, a = 0.6, 0.9
  sigma = a * math.sqrt(t / (1 - t))
  drift = v + sigma**2 / (2 * t) * (x + (1 - t) * v)
  for step in (1e-1, 1e-2, 1e-3):
    t_next = np.float32(t - step)
    delta = float(np.float32(t) - t_next)  # the step the float32 inputs actually describe
    mean, std = sde.sde_step_mean_std(x, v, t, t_next, a)
    np.testing.assert_allclose(
      (np.asarray(mean, np.float64) - x) / -delta, drift, rtol=2e-3, atol=2e-3
    )
    assert float(std) == pytest.approx(sigma * math.sqrt(delta), rel=1e-6)


def test_sde_preserves_gaussian_marginals():
  """For x0 ~ N(m, s^2), the exact velocity field is known; the SDE must land on N(m, s^2)."""
  m, s, n_samples = 0.7, 0.4, 20000
  sigmas = np.linspace(1.0, 1 / 40, 40).tolist() + [0.0]

  def velocity(x, t):
    var_t = (1 - t) ** 2 * s**2 + t**2
    return (t - (1 - t) * s**2) / var_t * (x - (1 - t) * m) - m

  def run(noise_level, key):
    x = jax.random.normal(key, (n_samples, 1))
    for i in range(40):
      key, sub = jax.random.split(key)
      x, _, _, _ = sde.sde_step(
        x, velocity(x, sigmas[i]), sigmas[i], sigmas[i + 1], noise_level, sub
      )
    return np.asarray(x)

  for noise_level in (0.0, 0.7):
    x0 = run(noise_level, jax.random.key(4))
    assert abs(x0.mean() - m) < 0.02 and abs(x0.std() - s) < 0.03, (
      noise_level,
      x0.mean(),
      x0.std(),
    )


def test_log_prob_and_kl():
  rng = np.random.default_rng(5)
  mean = rng.standard_normal((4, 300)).astype(np.float32)
  mean_b = mean + 0.1 * rng.standard_normal((4, 300)).astype(np.float32)
  std = np.float32(0.3)
  x = np.asarray(sde.sde_sample(mean, std, jax.random.key(0)))
  np.testing.assert_allclose(
    sde.gaussian_log_prob(x, mean, std), _np_log_prob(x, mean, std), rtol=1e-5
  )
  kl = np.asarray(sde.kl_closed_form(mean, mean_b, std))
  ref_kl = (((mean.astype(np.float64) - mean_b) ** 2) / (2 * 0.3**2)).mean(axis=1)
  np.testing.assert_allclose(kl, ref_kl, rtol=1e-5)
  # KL(a || b) = E_a[log p_a - log p_b] for the dimension-averaged log-probs.
  draws = jax.vmap(lambda k: sde.sde_sample(mean, std, k))(jax.random.split(jax.random.key(1), 400))
  log_ratio = jax.vmap(
    lambda z: sde.gaussian_log_prob(z, mean, std) - sde.gaussian_log_prob(z, mean_b, std)
  )(draws)
  np.testing.assert_allclose(np.asarray(log_ratio).mean(0), ref_kl, atol=3e-3)


def test_sde_step_under_mesh_sharding():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from qwen_image_rl.parallel import make_mesh

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  x = jax.device_put(jnp.ones((8, 4, 16)), batch)
  t = jax.device_put(jnp.full((8,), 0.5), batch)
  x_next, log_prob, _, _ = jax.jit(sde.sde_step)(x, x, t, t - 0.1, 0.7, jax.random.key(0))
  single, single_lp, _, _ = sde.sde_step(
    np.ones((8, 4, 16)), np.ones((8, 4, 16)), 0.5, 0.4, 0.7, jax.random.key(0)
  )
  np.testing.assert_allclose(x_next, single, rtol=1e-6)
  np.testing.assert_allclose(log_prob, single_lp, atol=1e-6)
