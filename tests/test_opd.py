"""On-policy distillation (rl/opd.py, rl/teachers.py, trainers/opd.py) on a tiny random pipeline.

Covers: the loss against a per-sample, per-step numpy computation; a zero gradient when the
teacher is the student at CFG 1; 8 devices == 1 device; the teacher bank keeping only the active
teacher on the device; a missing or mismatched teacher failing at start with its name; the
trainer end to end (export, eval at CFG 1, routing of both tasks); exact resume after SIGKILL.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import opd as opd_config  # noqa: E402
from tests import kill_and_resume  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def pipe_dirs(tmp_path_factory):
  """(student/base, another teacher with the same architecture and other weights)."""
  from tests import tiny_reference

  _, base = tiny_reference.build_t2i(str(tmp_path_factory.mktemp("opd_base")))
  _, other = tiny_reference.build_t2i(str(tmp_path_factory.mktemp("opd_other")), seed=1)
  return base, other


def small_opd(base, teacher_t2i=None, teacher_edit=None):
  c = opd_config.get_config("tiny")
  c.init_from = base
  c.teachers.t2i = teacher_t2i or base
  c.teachers.edit = teacher_edit or base
  c.total_steps = 3
  c.data.update(dict(image_size=32, num_prompts=8, max_text_tokens=48))
  c.opd.update(dict(batch_size=4, num_steps=3, num_train_steps=2, micro_batch_size=2))
  c.eval.update(
    dict(
      num_t2i=4,
      num_edits=2,
      image_size=32,
      num_steps=2,
      batch_size=4,
      max_text_tokens=48,
      every=0,
      at_start=False,
    )
  )
  c.checkpoint.update(dict(every=1, async_save=False))
  c.log.update(dict(every=1))
  return c


def _problem(pipe, task="t2i", b=2, k=3, seed=0):
  """A tiny model and a random distillation batch (states, sigmas, conditioning)."""
  import jax.numpy as jnp

  from qwen_image_rl.pipelines import common as pipe_common

  rng = np.random.default_rng(seed)
  shape = pipe_common.img_shape(4, 4)
  img_shapes = (shape, shape) if task == "edit" else (shape,)
  s, c = shape[1] * shape[2], 4 * pipe.latent_channels
  d = pipe.transformer.joint_attention_dim
  batch = dict(
    states=jnp.asarray(rng.normal(size=(b, k, s, c)), jnp.float32),
    sigmas=jnp.asarray([0.9, 0.5, 0.2][:k], jnp.float32),
    cond=jnp.asarray(rng.normal(size=(b, 5, d)), jnp.float32),
    mask=jnp.asarray(np.array([[1] * 5, [1, 1, 1, 0, 0]] * (b // 2)), jnp.int32),
    neg_cond=jnp.asarray(rng.normal(size=(b, 3, d)), jnp.float32),
    neg_mask=jnp.ones((b, 3), jnp.int32),
    ref_latents=(jnp.asarray(rng.normal(size=(b, s, c)), jnp.float32) if task == "edit" else None),
  )
  return batch, img_shapes


@pytest.fixture(scope="module")
def base_pipe(pipe_dirs):
  from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline

  return QwenImagePipeline.from_pretrained(pipe_dirs[0])


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_loss_equals_per_step_numpy(base_pipe, task):
  import jax

  from qwen_image_rl.rl import opd
  from qwen_image_rl.sampling.guidance import velocity

  model, params = base_pipe.transformer, base_pipe.transformer_params
  batch, img_shapes = _problem(base_pipe, task)
  rng = np.random.default_rng(1)
  batch["teacher_v"] = rng.normal(size=batch["states"].shape).astype(np.float32)
  loss, _ = jax.jit(lambda p, b: opd.opd_loss(p, model, b, img_shapes=img_shapes))(params, batch)
  b, k = batch["states"].shape[:2]
  errors = []
  for i in range(b):  # one transformer call per (sample, step), no folding
    for n in range(k):
      ref = None if batch["ref_latents"] is None else batch["ref_latents"][i : i + 1]
      v = np.asarray(
        velocity(
          model,
          params,
          batch["states"][i : i + 1, n],
          batch["sigmas"][n],
          batch["cond"][i : i + 1],
          batch["mask"][i : i + 1],
          img_shapes,
          ref,
        )
      )
      errors.append(np.mean((v[0] - batch["teacher_v"][i, n]) ** 2))
  np.testing.assert_allclose(float(loss), np.mean(errors), rtol=1e-5)


def test_gradient_vanishes_when_the_teacher_is_the_student_at_cfg_1(base_pipe):
  import jax

  from qwen_image_rl.rl import opd

  model, params = base_pipe.transformer, base_pipe.transformer_params
  batch, img_shapes = _problem(base_pipe, "t2i", b=4)

  def grad_norm(cfg_scale):
    teacher_v = opd.teacher_velocities(
      model, params, batch, cfg_scale=cfg_scale, img_shapes=img_shapes, micro_batch_size=2
    )
    train = {k: v for k, v in batch.items() if k not in ("neg_cond", "neg_mask")}
    grads, metrics = opd.opd_grads(
      params, model, dict(train, teacher_v=teacher_v), img_shapes=img_shapes, micro_batch_size=2
    )
    return float(jax.tree.reduce(max, jax.tree.map(lambda g: np.abs(g).max(), grads))), metrics

  at_1, m1 = grad_norm(1.0)
  at_4, m4 = grad_norm(4.0)
  assert float(m1["loss"]) < 1e-10 and at_1 < 1e-5, (float(m1["loss"]), at_1)
  assert float(m4["loss"]) > 1e-3 and at_4 > 1e-2, (float(m4["loss"]), at_4)


def test_eight_devices_equal_one(base_pipe):
  import jax
  import optax

  from qwen_image_rl import parallel
  from qwen_image_rl.rl import opd
  from qwen_image_rl.rl.policy import init_policy_state

  assert jax.device_count() == 8
  model, params = base_pipe.transformer, base_pipe.transformer_params
  batch, img_shapes = _problem(base_pipe, "edit", b=8)
  teacher_v = opd.teacher_velocities(model, params, batch, cfg_scale=4.0, img_shapes=img_shapes)
  train = {k: v for k, v in batch.items() if k not in ("neg_cond", "neg_mask")}
  train["teacher_v"] = teacher_v
  rules = parallel.as_rules(opd_config.get_config("tiny").logical_axis_rules)
  out = {}
  for n in (1, 8):
    mesh = parallel.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:n])
    tx = optax.sgd(1.0)  # the update is the gradient: Adam would amplify rounding near g = 0
    state, shardings = init_policy_state(model, params, tx, mesh, rules, 0)
    put = lambda x: (
      None
      if x is None
      else jax.device_put(
        x,
        parallel.batch_sharding(mesh, np.shape(x), rules)
        if np.ndim(x) > 1
        else parallel.replicated(mesh),
      )
    )
    step = jax.jit(
      opd.make_opd_train_step(model, tx, rules, img_shapes=img_shapes, micro_batch_size=4),
      out_shardings=(shardings, None),
    )
    with parallel.sharding_context(mesh, rules):
      new, metrics = step(state, jax.tree.map(put, train))
    out[n] = (jax.device_get(new.params), float(metrics["loss"]))
  assert out[1][1] == pytest.approx(out[8][1], rel=1e-5)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), out[8][0], params))
  assert max(moved) > 1e-6
  for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[8][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_only_the_active_teacher_is_on_the_device(pipe_dirs, base_pipe):
  import jax
  import optax

  from qwen_image_rl import parallel
  from qwen_image_rl.rl.policy import policy_shardings
  from qwen_image_rl.rl.teachers import TeacherBank

  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rules = parallel.as_rules(opd_config.get_config("tiny").logical_axis_rules)
  shardings = policy_shardings(base_pipe.transformer, optax.sgd(1.0), mesh, rules).params
  bank = TeacherBank.load({"t2i": pipe_dirs[0], "edit": pipe_dirs[1]}, shardings, np.float32)
  assert all(
    isinstance(x, np.ndarray) for t in ("t2i", "edit") for x in jax.tree.leaves(bank.host[t])
  )
  before = len(jax.live_arrays())
  t2i = bank.activate("t2i")
  n_leaves = len(jax.tree.leaves(t2i))
  assert len(jax.live_arrays()) == before + n_leaves
  assert bank.on_device("t2i") and not bank.on_device("edit")
  edit = bank.activate("edit")
  assert all(x.is_deleted() for x in jax.tree.leaves(t2i))  # device copy freed
  assert len(jax.live_arrays()) == before + n_leaves  # one teacher's worth, never two
  assert bank.on_device("edit") and not bank.on_device("t2i")
  host_t2i = jax.tree.leaves(bank.host["t2i"])
  assert all(isinstance(x, np.ndarray) for x in host_t2i)
  # The swap really changed the weights on the device.
  diffs = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(edit), host_t2i)]
  assert max(diffs) > 1e-3
  assert bank.swaps == 2 and bank.last_swap_seconds > 0
  bank.release()
  assert len(jax.live_arrays()) == before


def _expect_start_failure(c, tmp_path, match):
  from qwen_image_rl import main
  from qwen_image_rl.config_lib import ConfigError

  with pytest.raises(ConfigError, match=match):
    main.run(c, str(tmp_path / "run"))
  assert not os.path.isdir(tmp_path / "run" / "checkpoints")  # failed before building


def test_missing_or_mismatched_teacher_fails_at_start(pipe_dirs, tmp_path):
  base = pipe_dirs[0]
  _expect_start_failure(
    small_opd(base, teacher_edit=str(tmp_path / "nope")),
    tmp_path,
    r"config.teachers.edit=.*nope.*no model_index.json there",
  )
  c = small_opd(base)
  c.teachers.t2i = ""
  _expect_start_failure(c, tmp_path, r"config.teachers.t2i is empty")
  deeper = str(tmp_path / "deeper")
  shutil.copytree(base, deeper)
  path = os.path.join(deeper, "transformer", "config.json")
  with open(path) as f:
    config = json.load(f)
  config["num_layers"] = 3
  with open(path, "w") as f:
    json.dump(config, f)
  _expect_start_failure(
    small_opd(base, teacher_t2i=deeper),
    tmp_path,
    r"config.teachers.t2i=.*deeper.*architecture differs.*num_layers 3 "
    r"\(student 2\)",
  )
  wider = str(tmp_path / "wider")
  shutil.copytree(base, wider)
  path = os.path.join(wider, "vae", "config.json")
  with open(path) as f:
    config = json.load(f)
  config["z_dim"] = 8
  with open(path, "w") as f:
    json.dump(config, f)
  _expect_start_failure(
    small_opd(base, teacher_edit=wider),
    tmp_path,
    r"config.teachers.edit=.*latent_channels 8 \(student 4\)",
  )


def test_opd_trains_routes_both_tasks_evaluates_and_exports(pipe_dirs, tmp_path, capsys):
  from qwen_image_rl import main
  from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
  from qwen_image_rl.rl import routing

  c = small_opd(pipe_dirs[0], teacher_edit=pipe_dirs[1])
  c.total_steps = 4
  tasks = [routing.route_task(c.seed, it, c.opd.t2i_fraction) for it in range(4)]
  assert tasks.count("t2i") == 2, tasks  # half T2I in any window
  workdir = str(tmp_path / "opd")
  results = main.run(c, workdir)
  assert 0.0 <= results["t2i"]["overall"] <= 1.0 and results["n_samples"] == 6
  assert 0.0 <= results["edit"]["instruction_following"] <= 1.0
  out = capsys.readouterr().out
  for it, task in enumerate(tasks):
    assert f"iteration {it + 1} [{task}]" in out, out[-2000:]
  assert "student CFG 1" in out
  export = os.path.join(workdir, "export", "pipeline")
  pipe = QwenImagePipeline.from_pretrained(export)
  images = pipe(prompt=["a red circle"], num_inference_steps=2, height=32, width=32, seed=0)
  assert images.shape == (1, 32, 32, 3)


def test_routing_keeps_the_ratio_in_every_window():
  from qwen_image_rl.rl import routing

  for seed in range(3):
    for f, block in ((0.5, 1), (0.25, 1), (0.7, 3)):
      tasks = np.array([routing.route_task(seed, it, f, block) == "t2i" for it in range(300)])
      blocks = tasks[::block]
      assert all(
        np.all(tasks[j * block : (j + 1) * block] == blocks[j]) for j in range(len(blocks))
      )
      for start in range(0, len(blocks) - 20, 7):
        assert abs(blocks[start : start + 20].sum() - 20 * f) <= 1.0
  assert len({tuple(routing.route_task(s, it, 0.5) for it in range(6)) for s in range(6)}) == 2


@pytest.mark.slow
def test_opd_exact_resume_after_sigkill(pipe_dirs, tmp_path):
  steps = 4
  code = (
    "from tests.test_opd import small_opd\n"
    f"c = small_opd({pipe_dirs[0]!r}, teacher_edit={pipe_dirs[1]!r}); "
    f"c.total_steps = {steps}; c.eval.update(dict(num_t2i=0, num_edits=0))"
  )
  kill_and_resume.assert_killed_then_resumed_run_is_exact(
    code, str(tmp_path / "straight"), str(tmp_path / "resumed"), steps, kill_after_step=1
  )


def test_configs_validate_and_bad_settings_are_named():
  from qwen_image_rl import trainers
  from qwen_image_rl.config_lib import ConfigError

  for variant in ("tiny", "qwen_image"):
    assert trainers.validate(opd_config.get_config(variant)).name == "opd"
  big = opd_config.get_config("qwen_image")
  assert (big.opd.num_steps, big.data.image_size, big.model.dtype) == (40, 1024, "bfloat16")
  for field, value, match in (
    ("t2i_fraction", 1.5, "opd.t2i_fraction=1.5"),
    ("num_train_steps", 11, "opd.num_train_steps=11"),
    ("teacher_cfg_scale", 0.5, "opd.teacher_cfg_scale=0.5"),
    ("micro_batch_size", 5, "opd.micro_batch_size=5"),
  ):
    c = opd_config.get_config("tiny")
    c.opd[field] = value
    with pytest.raises(ConfigError, match=match):
      trainers.validate(c)
