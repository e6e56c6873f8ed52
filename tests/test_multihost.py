"""Multi-host as a tested path: the tiny sft and grpo jobs as 2 processes x 4 CPU devices
(jax.distributed over gloo on 127.0.0.1, launched through main's --coordinator_address flags).

Each test checks, for one trainer: the 2x4 run's final train state equals the 1x8 run's (to
float rounding: cross-process all-reduces sum in another order); SIGKILL of both processes
mid-run and a restart from the shared checkpoint directory ends bit-identical to the straight
2x4 run; only process 0 writes config.json, results and exports.

No persistent compilation cache: jax writes it from process 0 only and keys a multi-process
program per process, so the 2x4 runs would never hit it, while process 0's cache hits on local
programs would only let it run ahead of process 1.
"""

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from qwen_image_rl.checkpoint import committed_steps  # noqa: E402
from tests import multiprocess  # noqa: E402

# A 2x4 run's parameters vs the 1x8 run's: the gloo all-reduce adds in a different order (the
# grpo trial differed by at most 4.5e-8 in f32). An update moves weights by ~lr = 1e-4 or more.
ROUNDING = 1e-6


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
  from tests import tiny_reference

  _, path = tiny_reference.build_t2i(str(tmp_path_factory.mktemp("tiny_pipe")))
  return path


def _assert_state_equal(a: dict, b: dict, atol: float = 0.0) -> None:
  assert a.keys() == b.keys() and len(a) > 10
  for key in a:
    if atol:
      np.testing.assert_allclose(a[key], b[key], rtol=0, atol=atol, err_msg=key)
    else:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _params_moved(before: dict, after: dict) -> float:
  return max(
    float(np.max(np.abs(after[k].astype(np.float64) - before[k])))
    for k in after
    if "params" in k and "opt_state" not in k
  )


def check_multihost_job(tmp_path, config_code: str, steps: int, exports: tuple[str, ...]):
  config_file = multiprocess.write_config_file(str(tmp_path / "job_config.py"), config_code)
  straight, resumed, single = (str(tmp_path / n) for n in ("straight", "resumed", "single"))
  run = lambda workdir, **kw: multiprocess.run(config_file, workdir, timeout=1800, **kw)

  run(straight, tag="straight")
  run(resumed, kill_after_step=1, tag="killed")
  assert max(committed_steps(os.path.join(resumed, "checkpoints"))) < steps
  run(resumed, tag="resumed")
  with open(resumed + ".resumed.0.log") as f:
    assert "Resumed from" in f.read()
  final = multiprocess.final_state(straight, steps)
  _assert_state_equal(final, multiprocess.final_state(resumed, steps))

  run(single, processes=1, devices=8, tag="single")
  _assert_state_equal(final, multiprocess.final_state(single, steps), atol=ROUNDING)
  first = multiprocess.final_state(straight, 1)
  assert _params_moved(first, final) > 100 * ROUNDING  # the tolerance is far below an update

  for workdir in (straight, resumed):
    assert multiprocess.files_written(workdir, 1) == set()
    written = multiprocess.files_written(workdir, 0)
    assert "config.json" in written, sorted(written)
    for prefix in ("results" + os.sep, *exports):
      assert any(w.startswith(prefix) for w in written), (prefix, sorted(written))


def test_distributed_flags_go_together_and_are_checked(monkeypatch):
  from qwen_image_rl.parallel import mesh

  assert mesh.distributed_args() == {}
  args = dict(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3)
  assert mesh.distributed_args(**args) == args
  with pytest.raises(ValueError, match=r"missing \['--process_id'\]"):
    mesh.distributed_args(coordinator_address="10.0.0.2:1234", num_processes=4)
  with pytest.raises(ValueError, match="--process_id=4 must be in"):
    mesh.distributed_args(**dict(args, process_id=4))
  with pytest.raises(ValueError, match="expected HOST:PORT"):
    mesh.distributed_args(**dict(args, coordinator_address="10.0.0.2"))
  with pytest.raises(ValueError, match="config.distributed='sometimes'"):
    mesh.maybe_initialize_distributed("sometimes")
  # One CPU host with no cluster environment: 'auto' stays single-process.
  for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not mesh.on_tpu_vm()
  assert not mesh.maybe_initialize_distributed("auto")


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.torch
def test_grpo_two_processes(pipe_dir, tmp_path):
  steps = 3
  code = (
    "from tests.test_grpo_trainer import _small_grpo\n"
    f"c = _small_grpo({pipe_dir!r})\n"
    f"c.total_steps = {steps}; c.eval.num_t2i = 2; c.eval.num_edits = 0\n"
    "c.log.images_every = 0"
  )
  check_multihost_job(tmp_path, code, steps, exports=(os.path.join("export", "pipeline"),))


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.torch
def test_sft_two_processes(pipe_dir, tmp_path):
  steps = 3
  vae_dir = os.path.join(pipe_dir, "vae")
  code = (
    "from tests.test_trainers import _small_sft\n"
    f"c = _small_sft({vae_dir!r})\n"
    f"c.total_steps = {steps}; c.eval.num_t2i = 2; c.eval.num_edits = 0\n"
    "c.checkpoint.every = 1; c.checkpoint.async_save = False"
  )
  check_multihost_job(tmp_path, code, steps, exports=(os.path.join("export", "pipeline"),))
