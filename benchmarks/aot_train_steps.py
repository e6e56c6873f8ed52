"""AOT-compile the trainers' real programs for a TPU topology, on a CPU host.

  JAX_PLATFORMS=cpu python benchmarks/aot_train_steps.py --topology=v5p:2x4x4 \
      [--steps=rollout,update,opd] [--attention=flash,xla] [--cost=update] [--set rl.x=y ...]

With the shipped full-size configs and their meshes (`configs/grpo_t2i.py:qwen_image` for the
GRPO programs, `configs/opd.py:qwen_image` for OPD; `--grpo_config` / `--opd_config` name
others), it lowers the very jitted functions the trainers call, with abstract sharded inputs
(nothing is allocated), and compiles them with libtpu:

  rollout        one rollout chunk: SDE sampling with CFG over rl.num_steps, prompts already
                 encoded (rl/rollout.py's jitted rollout, as collect.Roller calls it)
  rollout_decode that chunk's VAE decode to images (pipelines/common.decode_packed)
  update         the objective's train step from rl/iteration.make_update_step: AdamW on float32
                 master weights, gradient accumulation over rl.micro_batch_size
  opd_rollout    the OPD student's CFG-free ODE over every state (rl/opd.jitted_trajectory)
  opd_teacher    the teacher's true-CFG velocities at the trained states (micro-batched)
  opd_update     the OPD trainer's student forward+backward and AdamW step (opd_iteration's
                 Distiller.steps)

`--steps` takes these names or the groups rollout (= rollout, rollout_decode), update and opd.

A short check on a tiny config (minutes on the 2-core CPU):

  JAX_PLATFORMS=cpu python benchmarks/aot_train_steps.py --topology=v5p:2x2x1 --steps=update \
      --set model.transformer.num_layers=2 --set model.transformer.num_attention_heads=2 \
      --set model.transformer.joint_attention_dim=64 --set data.image_size=64 \
      --set data.max_text_tokens=32 --set mesh.fsdp=4 --set rl.prompts_per_step=4 \
      --set rl.group_size=2 --set rl.rollout_chunks=2 --set rl.micro_batch_size=4 \
      --set rl.num_steps=4 --set rl.timesteps.num_train=2 --set rl.timesteps.first_m=3
Per step it prints one JSON line: per-chip memory (the program's arguments, outputs, aliased
and temporary bytes, plus `resident_bytes`: what the trainer keeps on the chips that is not an
argument of this program, e.g. the AdamW moments during the rollout or the active teacher
during the OPD update), `per_chip_bytes` (program + resident), `hbm_bytes`, `headroom`,
`flops_per_chip`, `estimated_seconds` (the compiler's `optimal_seconds`), `model_flops_per_chip`
(analytic transformer matmul FLOPs without rematerialisation) and `mfu` (model FLOPs / (estimated
seconds x peak)).

XLA's cost analysis counts a loop body once, and these programs are loops (over layers,
micro-batches, denoising steps). For the steps named in `--cost`, the script also compiles the
step with 1 and 2 unrolled layers and one loop iteration (one micro-batch, one denoising step)
and extrapolates to L layers x iterations (benchmarks/aot_common.extrapolate); the other steps
report memory only (cost fields null).

Measured on the 2-core CPU dev box under heavy load (libtpu 0.0.42.1; compiler analyses, not TPU
measurements), `--topology=v5p:2x4x4 --steps=update --cost=update` (grpo_t2i:qwen_image, mesh
data 4 x fsdp 8, 512 samples x 6 trained steps, micro-batches of 16, flash attention):
  per chip 77.28 GiB of 95 (headroom 18.6%): arguments 28.90 (the f32 params and AdamW moments
  sharded 8 ways, 28.54, and the batch), temporaries 48.38, outputs 28.60 all aliased (donated);
  2.713e16 flops per chip (2.255e16 model flops), 6.94e13 bytes accessed, estimated 89.7 s per
  update -> MFU 54.8% (HFU 65.9%). Compile 641 s, probes 331 s and 489 s.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import types
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aot_common
import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_image_rl import optim, parallel, precision
from qwen_image_rl.config_lib import transformer_overrides
from qwen_image_rl.models import attention_kernels
from qwen_image_rl.models.mmdit import QwenImageTransformer
from qwen_image_rl.models.vae import QwenImageVAE
from qwen_image_rl.pipelines import common as pipe_common
from qwen_image_rl.rl import iteration, objectives, opd, opd_iteration
from qwen_image_rl.rl import rollout as rl_rollout
from qwen_image_rl.rl.policy import policy_shardings
from qwen_image_rl.train_state import TrainState

STEPS = ("rollout", "rollout_decode", "update", "opd_rollout", "opd_teacher", "opd_update")
GROUPS = {
  "rollout": ("rollout", "rollout_decode"),
  "update": ("update",),
  "opd": ("opd_rollout", "opd_teacher", "opd_update"),
}
GiB = aot_common.GiB


# ------------------------------------------------------------------------------------------
# Configs, models and abstract inputs
# ------------------------------------------------------------------------------------------


def load_config(spec: str, overrides=()):
  """`configs/<file>.py[:variant]` -> its ConfigDict, with `a.b=value` overrides applied (those
  whose top-level section the config has: one list serves the GRPO and the OPD config)."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("cfg", path))
  module.__spec__.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    if (parents[0] if parents else leaf) not in config:
      continue
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def build_model(config, num_layers=None, scan_layers=None) -> QwenImageTransformer:
  """The config's transformer as the trainers load it (shapes from config.model.transformer,
  compute/storage dtypes from precision.model_dtypes, transformer_overrides on top)."""
  fields = dict(config.model.transformer)
  fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
  fields.update(transformer_overrides(config))
  if num_layers is not None:
    fields.update(num_layers=num_layers, scan_layers=scan_layers)
  return QwenImageTransformer(**fields, **precision.model_dtypes(config))


@dataclasses.dataclass
class Layout:
  """Mesh, rules and token layout of one config on the topology's devices."""

  mesh: Any
  rules: tuple
  latent_h: int
  latent_w: int
  img_shapes: tuple
  seq_len: int
  channels: int
  txt_len: int

  @property
  def chips(self) -> int:
    return self.mesh.size

  def batch(self, shape, dtype=jnp.float32):
    return aot_common.abstract(shape, dtype, parallel.batch_sharding(self.mesh, shape, self.rules))

  def rep(self, shape, dtype=jnp.float32):
    return aot_common.abstract(shape, dtype, parallel.replicated(self.mesh))

  def latents(self, b):
    return self.batch((b, self.seq_len, self.channels))

  def text(self, b, width):
    return self.batch((b, self.txt_len, width)), self.batch((b, self.txt_len), jnp.int32)


def layout_of(config, devices, vae, task: str = "t2i") -> Layout:
  mesh = parallel.make_mesh(dict(config.mesh), devices=devices)
  size = config.data.image_size
  h, w = pipe_common.latent_size(size, size, vae.spatial_compression_ratio)
  shape = pipe_common.img_shape(h, w)
  img_shapes = (shape, shape) if task == "edit" else (shape,)
  return Layout(
    mesh,
    parallel.as_rules(config.logical_axis_rules),
    h,
    w,
    img_shapes,
    shape[1] * shape[2],
    4 * vae.z_dim,
    config.data.max_text_tokens,
  )


def abstract_state(model, tx, lay: Layout):
  """The TrainState's ShapeDtypeStructs in the trainers' shardings (policy.policy_shardings),
  and those shardings."""
  shardings = policy_shardings(model, tx, lay.mesh, lay.rules)
  boxed = model.abstract_params()
  shapes = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=nn.meta.unbox(boxed),
    opt_state=nn.meta.unbox(jax.eval_shape(tx.init, boxed)),
    rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
  )
  state = jax.tree.map(lambda a, s: aot_common.abstract(a.shape, a.dtype, s), shapes, shardings)
  return state, shardings


def key_spec(lay: Layout):
  key = jax.eval_shape(lambda: jax.random.key(0))
  return aot_common.abstract(key.shape, key.dtype, parallel.replicated(lay.mesh))


# ------------------------------------------------------------------------------------------
# The programs
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
  """A jitted function with abstract arguments, how many times the trainer runs its loop body
  per call beyond the layers (`repeat`, for cost extrapolation), the analytic model FLOPs per
  chip and what else stays resident on each chip meanwhile."""

  jitted: Any
  args: tuple
  repeat: int
  model_flops: float
  resident_bytes: int


def forward_flops(model, lay: Layout) -> float:
  n_img = sum(f * h * w for f, h, w in lay.img_shapes)
  return aot_common.transformer_flops(model, n_img, lay.txt_len)


def rollout_program(config, model, lay, probe: bool, state) -> Program:
  rl = config.rl
  chunk = rl.prompts_per_step * rl.group_size // rl.rollout_chunks
  steps = 1 if probe else rl.num_steps
  records = objectives.get(rl.objective).records == "transitions"
  k = rl.timesteps.num_train if records else 0
  guided = rl_rollout.rollout_is_guided(rl.cfg_mode)
  width = model.joint_attention_dim
  cond, mask = lay.text(chunk, width)
  neg = lay.text(chunk, width) if guided else (None, None)
  fn = rl_rollout.jitted_rollout(model, lay.img_shapes, guided, rl.get("sde_type", "flow_grpo"))
  args = (
    state.params,
    lay.latents(chunk),
    cond,
    mask,
    *neg,
    lay.rep((steps + 1,)),
    lay.rep((k,), jnp.int32),
    key_spec(lay),
    lay.rep(()),
    lay.rep(()),
    None,
  )
  # Resident: the AdamW moments, and the transitions of the batch's other chunks.
  result = 2 * rl.prompts_per_step * rl.group_size * k * lay.seq_len * lay.channels * 4
  resident = aot_common.per_chip_bytes(state.opt_state) + result // lay.chips
  flops = forward_flops(model, lay) * (2 if guided else 1) * chunk * rl.num_steps / lay.chips
  return Program(fn, args, rl.num_steps, flops, resident)


def decode_program(config, vae, vae_params, lay, state) -> Program:
  rl = config.rl
  chunk = rl.prompts_per_step * rl.group_size // rl.rollout_chunks
  args = (vae, vae_params, lay.latents(chunk), lay.latent_h, lay.latent_w)
  resident = aot_common.per_chip_bytes(state)
  return Program(pipe_common.decode_packed, args, 1, 0.0, resident)


def rl_setup(config, model, lay) -> iteration.RLSetup:
  """An iteration.RLSetup with what `make_optimizer` / `make_update_step` read (no weights,
  prompts or rewards: the update step does not touch them)."""
  rl = config.rl
  pipe = types.SimpleNamespace(transformer=model)
  roller = types.SimpleNamespace(
    img_shapes=lay.img_shapes, batch=rl.prompts_per_step * rl.group_size
  )
  objective = objectives.get(rl.objective)
  return iteration.RLSetup(config, pipe, None, None, {}, objective, roller, lay.mesh, lay.rules)


def update_program(config, model, lay, probe: bool) -> Program:
  rl = config.rl
  if rl.objective != "grpo":
    raise NotImplementedError(f"update: rl.objective={rl.objective!r}; only 'grpo' is built")
  s = rl_setup(config, model, lay)
  tx = iteration.make_optimizer(s, config.total_steps * rl.inner_updates)
  state, shardings = abstract_state(model, tx, lay)
  step = iteration.make_update_step(s, tx, shardings)
  full = rl.prompts_per_step * rl.group_size
  micro = rl.micro_batch_size or full
  b = micro if probe else full
  k = rl.timesteps.num_train
  cond, mask = lay.text(b, model.joint_attention_dim)
  guided = rl_rollout.policy_is_guided(rl.cfg_mode)
  neg = lay.text(b, model.joint_attention_dim) if guided else (None, None)
  transitions = lay.batch((b, k, lay.seq_len, lay.channels))
  result = rl_rollout.RolloutResult(
    final_latents=lay.latents(b),
    latents_t=transitions,
    latents_next=transitions,
    log_probs=lay.batch((b, k)),
    sigmas=lay.batch((b, k)),
    sigmas_next=lay.batch((b, k)),
    step_indices=lay.rep((k,), jnp.int32),
  )
  inputs = dict(cond=cond, mask=mask, neg_cond=neg[0], neg_mask=neg[1], ref_latents=None)
  batch = s.objective.make_batch(s, state.params, result, inputs, lay.batch((b,)))
  ref = state.params if rl.kl_beta > 0 else None
  flops = 3 * forward_flops(model, lay) * (2 if guided else 1) * full * k / lay.chips
  return Program(step, (state, batch, ref), full // micro, flops, 0)


def opd_shapes(config):
  o = config.opd
  k = o.num_train_steps if 0 < o.num_train_steps < o.num_steps else o.num_steps
  return o.batch_size, k, o.micro_batch_size or o.batch_size


def opd_rollout_program(config, model, lay, probe, state, teacher) -> Program:
  o = config.opd
  b, _, _ = opd_shapes(config)
  steps = 1 if probe else o.num_steps
  cond, mask = lay.text(b, model.joint_attention_dim)
  fn = opd.jitted_trajectory(model, lay.img_shapes)
  args = (state.params, lay.latents(b), cond, mask, lay.rep((steps + 1,)), None)
  resident = aot_common.per_chip_bytes((state.opt_state, teacher))
  flops = forward_flops(model, lay) * b * o.num_steps / lay.chips
  return Program(fn, args, o.num_steps, flops, resident)


def opd_batch(model, lay, b, k):
  cond, mask = lay.text(b, model.joint_attention_dim)
  states = lay.batch((b, k, lay.seq_len, lay.channels))
  return dict(cond=cond, mask=mask, states=states, sigmas=lay.rep((k,))), states


def opd_teacher_program(config, model, lay, probe, state, teacher) -> Program:
  b, k, micro = opd_shapes(config)
  b_prog = micro if probe else b
  batch, _ = opd_batch(model, lay, b_prog, k)
  batch["neg_cond"], batch["neg_mask"] = lay.text(b_prog, model.joint_attention_dim)
  fn = opd.jitted_teacher_velocities(model, lay.img_shapes, b_prog // micro)
  flops = forward_flops(model, lay) * 2 * b * k / lay.chips
  resident = aot_common.per_chip_bytes(state)
  return Program(fn, (teacher, batch, lay.rep(())), b // micro, flops, resident)


def opd_update_program(config, model, lay, probe, teacher) -> Program:
  b, k, micro = opd_shapes(config)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state, shardings = abstract_state(model, tx, lay)
  data = {"t2i": types.SimpleNamespace(img_shapes=lay.img_shapes)}
  distiller = opd_iteration.Distiller(config, model, data, None, tx, shardings, lay.mesh, lay.rules)
  b_prog = micro if probe else b
  batch, states = opd_batch(model, lay, b_prog, k)
  batch.update(ref_latents=None, teacher_v=states)
  flops = 3 * forward_flops(model, lay) * b * k / lay.chips
  resident = aot_common.per_chip_bytes(teacher)
  return Program(distiller.steps["t2i"], (state, batch), b // micro, flops, resident)


def build_program(name, config, model, lay, probe: bool, vae=None, vae_params=None) -> Program:
  """The step `name` for `model` (the config's, or a 1-/2-layer probe of it)."""
  if name == "update":
    return update_program(config, model, lay, probe)
  if name.startswith("opd"):
    tx = optim.make_optimizer(config.optim, config.total_steps)
    state, _ = abstract_state(model, tx, lay)
    # Teachers are held in the compute dtype (TeacherBank.load), in the policy's shardings.
    teacher = jax.tree.map(
      lambda a: aot_common.abstract(a.shape, model.dtype, a.sharding), state.params
    )
    if name == "opd_update":
      return opd_update_program(config, model, lay, probe, teacher)
    make = opd_rollout_program if name == "opd_rollout" else opd_teacher_program
    return make(config, model, lay, probe, state, teacher)
  s = rl_setup(config, model, lay)
  state, _ = abstract_state(model, iteration.make_optimizer(s, config.total_steps), lay)
  if name == "rollout":
    return rollout_program(config, model, lay, probe, state)
  return decode_program(config, vae, vae_params, lay, state)


# ------------------------------------------------------------------------------------------
# Compile, measure, report
# ------------------------------------------------------------------------------------------


def compile_program(program: Program, lay: Layout, label: str):
  context = contextlib.ExitStack()
  context.enter_context(parallel.sharding_context(lay.mesh, lay.rules))
  context.enter_context(attention_kernels.kernel_everywhere())
  context.enter_context(jax.default_matmul_precision("default"))  # Mosaic needs it for bf16
  return aot_common.compile_with(program.jitted, program.args, context, label)


def measure(name, config, devices, args, attention: str) -> dict:
  """One step's JSON record: memory from the full program, cost from unrolled probes."""
  config.model.transformer_overrides.attention_implementation = attention
  vae = QwenImageVAE()
  lay = layout_of(config, devices, vae)
  model = build_model(config)
  vae_params = None
  if name == "rollout_decode":
    boxed = jax.eval_shape(vae.init, jax.random.key(0), vae.dummy_images())
    vae_params = aot_common.abstract_tree(boxed, lay.mesh, lay.rules)
  program = build_program(name, config, model, lay, False, vae, vae_params)
  compiled, seconds = compile_program(program, lay, f"{name}, {attention}")
  memory = aot_common.memory_of(compiled)
  direct_cost = aot_common.cost_of(compiled)  # whole only for a program without loops
  del compiled
  chip = aot_common.chip_of(args.topology)
  per_chip = memory["program_bytes"] + program.resident_bytes
  record = dict(
    topology=args.topology,
    step=name,
    attention=attention,
    chips=lay.chips,
    mesh=dict(lay.mesh.shape),
    **memory,
    resident_bytes=program.resident_bytes,
    per_chip_bytes=per_chip,
    hbm_bytes=chip["hbm_bytes"],
    headroom=round(1 - per_chip / chip["hbm_bytes"], 4),
    compile_seconds=round(seconds, 1),
    model_flops_per_chip=program.model_flops or None,
    flops_per_chip=None,
    bytes_accessed_per_chip=None,
    estimated_seconds=None,
    mfu=None,
  )
  if name in args.cost or name == "rollout_decode":
    record.update(estimate(name, config, lay, program, direct_cost, chip))
  return record


def estimate(name, config, lay, program, direct_cost, chip) -> dict:
  """Cost of the whole step: unrolled 1- and 2-layer probes of one loop iteration,
  extrapolated (the decode has no loop over layers: its own cost analysis)."""
  if name == "rollout_decode":
    cost, method = direct_cost, "program"
  else:
    costs = []
    for layers in (1, 2):
      probe = build_program(name, config, build_model(config, layers, False), lay, True)
      compiled, _ = compile_program(probe, lay, f"{name} probe, {layers} layer(s)")
      costs.append(aot_common.cost_of(compiled))
      del compiled
    cost = aot_common.extrapolate(*costs, config.model.transformer.num_layers, repeat=probe.repeat)
    method = "unrolled 1/2-layer probes x loop iterations"
  seconds = float(cost.get("optimal_seconds", float("nan")))
  flops = float(cost.get("flops", float("nan")))
  useful = program.model_flops or flops
  compute_bound = flops / chip["peak_flops"]
  memory_bound = float(cost.get("bytes accessed", float("nan"))) / chip["hbm_bandwidth"]
  if not seconds > 0:
    # libtpu 0.0.42.1's cost model returns negative optimal_seconds for v6e programs; a time
    # that is not positive is no estimate, so only the roofline bound below is reported.
    print(f"# {name}: the compiler's time estimate is {seconds:.3g} s, not usable", flush=True)
  usable = seconds if seconds > 0 else None
  return dict(
    flops_per_chip=flops,
    bytes_accessed_per_chip=float(cost.get("bytes accessed", float("nan"))),
    estimated_seconds=usable,
    compiler_optimal_seconds=seconds,
    mfu=round(useful / (seconds * chip["peak_flops"]), 4) if usable else None,
    hfu=round(flops / (seconds * chip["peak_flops"]), 4) if usable else None,
    # What bounds the estimate: all flops at peak vs all bytes at HBM bandwidth. The slower
    # of the two bounds the step's time from below, so the MFU from above.
    compute_bound_seconds=compute_bound,
    memory_bound_seconds=memory_bound,
    mfu_roofline_bound=round(useful / (max(compute_bound, memory_bound) * chip["peak_flops"]), 4),
    cost_method=method,
  )


def summary(r: dict) -> str:
  cost = ""
  if r["flops_per_chip"] is not None:
    bound = r["mfu_roofline_bound"]
    cost = f"; {r['flops_per_chip']:.3e} flops/chip, MFU <= {bound:.1%} (roofline)"
  if r["estimated_seconds"]:
    cost += f", est {r['estimated_seconds']:.3f} s, MFU {r['mfu']:.1%}"
  return (
    f"# {r['topology']} {r['step']} ({r['attention']}): per chip {r['per_chip_bytes'] / GiB:.2f}"
    f" GiB of {r['hbm_bytes'] / GiB:.0f} (headroom {r['headroom']:.1%}; args "
    f"{r['argument_bytes'] / GiB:.2f}, temp {r['temp_bytes'] / GiB:.2f}, out "
    f"{r['output_bytes'] / GiB:.2f}, aliased {r['alias_bytes'] / GiB:.2f}, resident "
    f"{r['resident_bytes'] / GiB:.2f}){cost}"
  )


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topology", default="v5p:2x4x4", help="e.g. v5p:2x4x4, v6e:16x16")
  p.add_argument("--steps", default="rollout,update,opd", help=f"of {STEPS} or {list(GROUPS)}")
  p.add_argument("--attention", default="flash", help="comma list of 'flash', 'xla'")
  p.add_argument("--cost", default="update", help="steps whose cost is extrapolated; 'all'")
  p.add_argument("--grpo_config", default="configs/grpo_t2i.py:qwen_image")
  p.add_argument("--opd_config", default="configs/opd.py:qwen_image")
  p.add_argument("--set", action="append", default=[], help="config override key=value")
  args = p.parse_args(argv)
  steps = []
  for s in args.steps.split(","):
    if s not in STEPS and s not in GROUPS:
      p.error(f"--steps: unknown step {s!r}; known: {list(STEPS)} and groups {list(GROUPS)}")
    steps += [x for x in GROUPS.get(s, (s,)) if x not in steps]
  args.steps = steps
  args.cost = STEPS if args.cost == "all" else tuple(args.cost.split(","))
  return args


def main(argv=None):
  args = parse_args(argv)
  devices = aot_common.topology_devices(args.topology)
  print(f"# {args.topology}: {len(devices)} chips ({devices[0].device_kind})", flush=True)
  records = []
  for attention in args.attention.split(","):
    for name in args.steps:
      spec = args.opd_config if name.startswith("opd") else args.grpo_config
      config = load_config(spec, args.set)
      record = measure(name, config, devices, args, attention)
      record["config"] = spec
      print(json.dumps(record), flush=True)
      print(summary(record), flush=True)
      records.append(record)
  return records


if __name__ == "__main__":
  main()
