"""Checkpointer: exact resume after SIGKILL, killed saves, sharded restore, clear errors."""

import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_image_rl import parallel
from qwen_image_rl.checkpoint import Checkpointer, CheckpointError, committed_steps
from tests import kill_and_resume

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")
TOTAL_STEPS = 20


def _child_env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def _start(workdir, *extra_args):
  log = open(os.path.join(str(workdir) + ".log"), "ab")
  return subprocess.Popen(
    [
      sys.executable,
      WORKER,
      "--workdir",
      str(workdir),
      "--total_steps",
      str(TOTAL_STEPS),
      *extra_args,
    ],
    env=_child_env(),
    stdout=log,
    stderr=subprocess.STDOUT,
  )


def _finish(proc, workdir, timeout=60):
  rc = proc.wait(timeout=timeout)
  if rc != 0:
    with open(str(workdir) + ".log", "rb") as f:
      log = f.read().decode(errors="replace")[-3000:]
    raise AssertionError(f"worker exited with {rc}:\n{log}")


def _read(path):
  try:
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return None


def _wait_for(predicate, proc, what, timeout=60):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"worker exited ({proc.returncode}) before {what}")
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


def _final(workdir):
  with np.load(os.path.join(workdir, "final.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted run (save_every=3, keep=2)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  proc = _start(workdir, "--sleep", "0")
  _finish(proc, workdir)
  return workdir


def _assert_same_final(workdir, reference):
  got, want = _final(workdir), _final(reference)
  assert sorted(got) == sorted(want)
  for k in want:
    assert np.array_equal(got[k], want[k]), f"{k} differs after resume"


def test_keep_last_k(reference_run):
  # Saves at 3, 6, ..., 18 and the forced final 20; keep=2.
  assert committed_steps(os.path.join(reference_run, "checkpoints")) == [18, 20]
  assert _read(os.path.join(reference_run, "restored")) == "none"


def test_sigkill_mid_run_resumes_bit_identical(tmp_path, reference_run):
  workdir = str(tmp_path / "run")
  progress = os.path.join(workdir, "progress")
  proc = _start(workdir)
  _wait_for(lambda: int(_read(progress) or 0) >= 11, proc, "step 11")
  kill_and_resume.sigkill(proc)
  killed_at = int(_read(progress))
  assert killed_at < TOTAL_STEPS
  steps = committed_steps(os.path.join(workdir, "checkpoints"))
  assert steps and steps[-1] <= killed_at and steps[-1] % 3 == 0, steps

  proc = _start(workdir)
  _finish(proc, workdir)
  assert int(_read(os.path.join(workdir, "restored"))) == steps[-1]
  _assert_same_final(workdir, reference_run)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, reference_run):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  proc = _start(workdir, "--pause_commit_at", "6")
  # The worker blocks the save of step 6 after all its files are written, just before the
  # atomic rename; kill it there.
  _wait_for(lambda: _read(os.path.join(workdir, "pausing")) == "6", proc, "the step-6 save")
  kill_and_resume.sigkill(proc)
  leftovers = [n for n in os.listdir(ckpt_dir) if n.startswith("6.orbax-checkpoint-tmp")]
  assert leftovers, os.listdir(ckpt_dir)  # The kill did land mid-save.
  assert os.path.exists(os.path.join(ckpt_dir, leftovers[0], "commit_success.txt"))
  assert committed_steps(ckpt_dir) == [3]

  proc = _start(workdir)
  _finish(proc, workdir)
  assert _read(os.path.join(workdir, "restored")) == "3"
  assert not [n for n in os.listdir(ckpt_dir) if "tmp" in n]  # Cleaned up on restart.
  _assert_same_final(workdir, reference_run)


class _TinyModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "mlp")),
      (x.shape[-1], 16),
    )
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (16,))
    return x @ kernel + bias


def test_restore_into_shardings(tmp_path):
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = _TinyModel()
  x = jnp.ones((2, 8))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  shardings = parallel.tree_shardings(abstract, mesh, parallel.DEFAULT_LOGICAL_AXIS_RULES)
  params = parallel.shard_tree(nn.meta.unbox(model.init(jax.random.key(0), x)), shardings)
  assert params["params"]["kernel"].sharding.spec == P("fsdp", "tensor")
  state = {"params": params["params"], "step": jnp.int32(7), "rng": jax.random.key(3)}

  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
  assert ckpt.save(7, state, {"data_position": 123})
  ckpt.wait()
  assert ckpt.latest_step() == 7

  # Restore into different shardings from the ones saved, as a resharded resume would.
  want = {
    "kernel": NamedSharding(mesh, P("tensor", ("data", "fsdp"))),
    "bias": NamedSharding(mesh, P("data")),
  }
  target = {
    "params": {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=want[k])
      for k, v in state["params"].items()
    },
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
    "rng": jax.eval_shape(lambda: jax.random.key(0)),
  }
  restored, extra = ckpt.restore(target)
  ckpt.close()
  assert extra == {"data_position": 123}
  for k in ("kernel", "bias"):
    got = restored["params"][k]
    assert got.sharding == want[k], (k, got.sharding)
    assert np.array_equal(np.asarray(got), np.asarray(state["params"][k]))
  assert int(restored["step"]) == 7
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert np.array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))


def test_mismatched_tree_names_keys(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, async_save=False)
  ckpt.save(1, {"params": {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}}, {})
  target = {
    "params": {
      "w": jax.ShapeDtypeStruct((4, 5), jnp.float32),
      "c": jax.ShapeDtypeStruct((3,), jnp.float32),
    }
  }
  with pytest.raises(CheckpointError) as e:
    ckpt.restore(target)
  message = str(e.value)
  assert "params.c" in message and "params.b" in message, message
  assert "params.w" in message and "(4, 3)" in message and "(4, 5)" in message, message
  with pytest.raises(CheckpointError, match="no committed checkpoint for step 5"):
    ckpt.restore(target, step=5)
  ckpt.close()


def test_paths_that_are_files(tmp_path):
  a_file = tmp_path / "workdir"
  a_file.write_text("not a directory")
  with pytest.raises(CheckpointError, match="is a file"):
    Checkpointer(str(a_file / "checkpoints"), save_every=1)

  ckpt_dir = tmp_path / "ckpt"
  ckpt = Checkpointer(str(ckpt_dir), save_every=1)
  assert ckpt.restore({"x": jnp.zeros(())}) is None
  (ckpt_dir / "12").write_text("oops")
  with pytest.raises(CheckpointError, match="12 is a file"):
    ckpt.latest_step()
  ckpt.close()


def test_maybe_save_cadence_and_bad_extra(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=4, keep=10)
  state = {"x": jnp.arange(3.0)}
  saved = [step for step in range(1, 10) if ckpt.maybe_save(step, state, {"s": step})]
  assert saved == [4, 8]
  assert not ckpt.save(8, state, {})  # Already saved: not again.
  with pytest.raises(CheckpointError, match="JSON"):
    ckpt.save(9, state, {"bad": object()})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8]
  restored, extra = ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, step=4)
  assert extra == {"s": 4}
  ckpt.close()
