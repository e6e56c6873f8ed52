"""End-to-end trainers at toy sizes: vae -> sft (+ eval), exact resume of sft after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import sft as sft_config  # noqa: E402
from configs import vae as vae_config  # noqa: E402


def _small_vae():
  c = vae_config.get_config("tiny")
  c.total_steps = 3
  c.model.vae.base_dim = 8
  c.data.update(dict(image_size=32, batch_size=4, num_train=16, num_eval=8))
  c.checkpoint.every = 2
  c.log.every = 1
  return c


def _small_sft(vae_dir):
  c = sft_config.get_config("tiny")
  c.total_steps = 6
  c.model.vae_from = vae_dir
  c.model.transformer.update(dict(num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                  axes_dims_rope=(4, 6, 6)))
  c.model.text_encoder.update(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   mrope_section=(1, 1, 2)))
  c.data.update(dict(image_size=32, num_train=16, num_train_edits=8, t2i_batch_size=4,
                     edit_batch_size=2, max_text_tokens=48))
  c.eval.update(dict(num_t2i=4, num_edits=2, image_size=32, num_steps=2, batch_size=4,
                     max_text_tokens=48))
  c.checkpoint.every = 2
  c.log.every = 1
  return c


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
  from qwen_image_rl import main

  workdir = str(tmp_path_factory.mktemp("vae"))
  results = main.run(_small_vae(), workdir)
  return workdir, results


def test_vae_trainer_exports_a_loadable_vae(vae_run):
  from qwen_image_rl.convert.vae import load_vae

  workdir, results = vae_run
  assert os.path.isfile(os.path.join(workdir, "config.json"))
  with open(os.path.join(workdir, "results", "eval_3.json")) as f:
    saved = json.load(f)
  assert saved["psnr"] == pytest.approx(results["psnr"])
  assert 0.0 <= saved["oracle_on_reconstructions"]["overall"] <= 1.0
  vae, _ = load_vae(os.path.join(workdir, "export", "vae"))
  # The latent statistics measured on held-out images are written into the exported config.
  assert len(vae.latents_std) == vae.z_dim and all(s > 0 for s in vae.latents_std)
  assert vae.latents_std != (1.0,) * vae.z_dim


def test_sft_trains_evaluates_and_exports(vae_run, tmp_path):
  from qwen_image_rl import main
  from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline

  workdir = str(tmp_path / "base")
  results = main.run(_small_sft(os.path.join(vae_run[0], "export", "vae")), workdir)
  with open(os.path.join(workdir, "results", "eval_6.json")) as f:
    saved = json.load(f)
  assert saved["step"] == 6 and saved["n_samples"] == 6
  for c, v in saved["t2i"]["by_category"].items():
    assert 0.0 <= v <= 1.0, c
  assert set(saved["t2i"]["by_category"]) == {"general", "typography", "portrait", "landscape"}
  assert 0.0 <= saved["edit"]["instruction_following"] <= 1.0
  assert saved["t2i"]["overall"] == pytest.approx(results["t2i"]["overall"])
  pipe = QwenImagePipeline.from_pretrained(os.path.join(workdir, "export", "pipeline"))
  images = pipe(prompt=["a red circle"], num_inference_steps=2, height=32, width=32, seed=0)
  assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


def _run_sft_subprocess(workdir, vae_dir, total_steps, kill_after_step=None):
  """Run sft in a child; optionally SIGKILL it once a checkpoint >= kill_after_step exists."""
  from qwen_image_rl.checkpoint import committed_steps

  code = (
      "import sys; sys.path.insert(0, %r)\n"
      "from tests.test_trainers import _small_sft\n"
      "from qwen_image_rl import main\n"
      "c = _small_sft(%r); c.total_steps = %d; c.eval.num_t2i = 0\n"
      "c.checkpoint.async_save = False\n"
      "main.run(c, %r)\n" % (REPO, vae_dir, total_steps, workdir))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  if kill_after_step is None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-3000:]
    return
  ckpt = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 600
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError("child finished before it could be killed: "
                           + proc.stdout.read().decode()[-3000:])
    if os.path.isdir(ckpt) and any(s >= kill_after_step for s in committed_steps(ckpt)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _final_params(workdir, step):
  import orbax.checkpoint as ocp

  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))
  return restored


@pytest.mark.slow
def test_sft_exact_resume_after_sigkill(vae_run, tmp_path):
  import jax

  vae_dir = os.path.join(vae_run[0], "export", "vae")
  steps = 8
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  _run_sft_subprocess(straight, vae_dir, steps)
  _run_sft_subprocess(resumed, vae_dir, steps, kill_after_step=2)
  from qwen_image_rl.checkpoint import committed_steps
  assert max(committed_steps(os.path.join(resumed, "checkpoints"))) < steps
  _run_sft_subprocess(resumed, vae_dir, steps)
  a, b = _final_params(straight, steps), _final_params(resumed, steps)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sft_rejects_a_text_budget_that_truncates_prompts(tmp_path):
  from qwen_image_rl.config_lib import ConfigError
  from qwen_image_rl.trainers import sft

  tokenizer = sft.build_tokenizer(str(tmp_path / "tok"))
  with pytest.raises(ConfigError, match=r"max_text_tokens=3 would truncate prompts: the longest "
                                        r"has 12 tokens"):
    sft.encode_texts(None, None, tokenizer, ["a red circle", "a large blue square at the top"],
                     sft.T2I_TEMPLATE, 3)


def test_demo_runs_a_stage_and_skips_it_once_done(tmp_path, capsys):
  """The demo driver and the entry point live in one process (their flags must not clash)."""
  from qwen_image_rl import demo, main  # noqa: F401  (both define absl flags)

  config = _small_vae()
  config.total_steps = 1
  demo.run_stage("vae", config, str(tmp_path))
  assert os.path.isdir(tmp_path / "vae" / "export" / "vae")
  demo.run_stage("vae", config, str(tmp_path))
  assert "final checkpoint exists" in capsys.readouterr().out
  assert "vae" in demo.summary(str(tmp_path))
  names = [name for name, _ in demo.stages(str(tmp_path))]
  assert names == ["vae", "base"]
