"""Our tiny GRPO iteration next to the PyTorch + diffusers one, in one process, interleaved.

  python benchmarks/grpo_vs_torch.py [--rounds=3] [--init_from=PIPELINE_DIR]
      [--scan_layers --remat_policy=full]

Both sides run the same work (issue 18; benchmarks/grpo_step_torch.py has the PyTorch side):
batch 64 = 8 prompts x G=8, 10 steps, K=3 trained steps, true CFG 4 in the rollout, one
clipped update of the conditional branch on the 192 recorded transitions, AdamW. Without
--init_from both load one random pipeline built here with the reference shapes
(grpo_step_torch.TINY_TRANSFORMER / TINY_VAE: hidden 128, 4 layers, 8x8x16 latents, 32 px),
so the weights are the same on both sides.

Ours runs as the trainer runs it (rl/iteration.py) with rewards scored inline
(rl.async_rewards=False), so that no reward thread competes with the rollout for the cores.
The rollout's VAE decode is timed apart by blocking on the latents before it. Each round runs
one iteration of ours, then one of PyTorch's; round 0 compiles / warms up and is not counted.
Ratios are PyTorch seconds / our seconds of the same round (> 1: ours is faster), reported as
the median over rounds with the range. The peak is a 2048^2 float32 matmul of each framework,
timed in the same process after the rounds.

On a machine shared with other jobs, PyTorch's 2-thread OpenMP barriers suffer far more from
oversubscription than XLA's pool does (measured at load ~11 on 2 cores: PyTorch's rollout 7.7x
slower than ours in one 2-thread run, 1.6x when both were pinned to one core). `taskset -c 0
python benchmarks/grpo_vs_torch.py` pins both frameworks to one core, which compares per-core
efficiency and is much less sensitive to the load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import grpo_step_torch as ref  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from grpo_step import rollout_step_flops, update_step_flops  # noqa: E402

PARTS = ("rollout", "decode", "update", "iteration")


def build_reference_pipeline(directory: str) -> str:
  """A diffusers QwenImagePipeline with the reference transformer and VAE (random weights) and
  a tiny text encoder of width 64; returns its directory."""
  from diffusers import QwenImagePipeline

  from qwen_image_rl.models import text_encoding
  from tests import tiny_reference

  text_hidden = ref.TINY_TRANSFORMER["joint_attention_dim"]
  parts = tiny_reference.build_components(directory, text_hidden=text_hidden)
  parts["transformer"], parts["vae"] = ref.load_models("")
  parts["text_encoder"] = text_encoder(parts["tokenizer"], text_hidden)
  pipe = QwenImagePipeline(**parts)
  pipe.prompt_template_encode_start_idx = text_encoding.template_drop_index(
    parts["tokenizer"], text_encoding.T2I_TEMPLATE
  )
  path = os.path.join(directory, "pipeline")
  pipe.save_pretrained(path)
  return path


def text_encoder(tokenizer, width: int):
  """tiny_reference's 2-layer text encoder at `width`, its M-RoPE sections scaled to match."""
  from transformers import Qwen2_5_VLForConditionalGeneration

  from tests import tiny_reference

  config = tiny_reference.tiny_qwen2_5_vl_config(tokenizer, width)
  half = width // config.text_config.num_attention_heads // 2
  sections = [half // 4, half // 4, half - 2 * (half // 4)]
  rope = config.text_config.rope_parameters
  rope["mrope_section"] = sections
  torch.manual_seed(0)
  return Qwen2_5_VLForConditionalGeneration(config).eval()


class Ours:
  """Our iteration, as the trainer composes it, with the decode timed apart."""

  def __init__(self, init_from: str, image_size: int, overrides: dict):
    from configs import grpo_t2i
    from qwen_image_rl import host_memory, optim, parallel
    from qwen_image_rl.pipelines import common as pipe_common
    from qwen_image_rl.rl import iteration
    from qwen_image_rl.rl.policy import init_policy_state

    host_memory.tune_malloc()
    c = grpo_t2i.get_config("tiny")
    c.init_from = init_from
    c.data.image_size = image_size
    c.data.num_prompts = 256
    c.rl.async_rewards = False
    c.model.transformer_overrides = overrides
    self.config, self.iteration = c, iteration
    mesh = parallel.make_mesh(dict(c.mesh))
    self.s = iteration.setup(c, mesh, parallel.as_rules(c.logical_axis_rules))
    tx = optim.make_optimizer(c.optim, 100)
    self.state, shardings = init_policy_state(
      self.s.model, self.s.pipe.transformer_params, tx, mesh, self.s.rules, 0
    )
    self.tx = tx
    self.step = iteration.make_update_step(self.s, tx, shardings)
    self.pipeline = iteration.make_reward_pipeline(c, self.s.reward_fn)
    self.decode_seconds = 0.0
    decode = pipe_common.decode_packed

    def timed_decode(vae, vae_params, packed, h, w):
      jax.block_until_ready(packed)  # the rollout's latents: the transformer part ends here
      t0 = time.perf_counter()
      out = jax.block_until_ready(decode(vae, vae_params, packed, h, w))
      self.decode_seconds += time.perf_counter() - t0
      return out

    pipe_common.decode_packed = timed_decode  # the roller calls it through the module

  def run(self, it: int) -> dict:
    it_ = self.iteration
    self.decode_seconds = 0.0
    t0 = time.perf_counter()
    got = it_.roll_out(self.s, self.state.params, jax.random.key(it), it, self.pipeline)
    rollout = got.rollout_seconds  # inline rewards are scored outside it
    t1 = time.perf_counter()
    adv, _ = it_.advantages(self.s, got)
    t2 = time.perf_counter()
    self.state, _ = it_.update(self.s, self.step, self.state, got, adv)
    jax.block_until_ready(self.state)  # the params too: the next rollout needs them
    t3 = time.perf_counter()
    update = t3 - t2
    return dict(
      rollout=rollout - self.decode_seconds,
      decode=self.decode_seconds,
      update=update,
      iteration=rollout + update,
      reward=got.reward_seconds,
      wall=t3 - t0 - (t2 - t1),
    )


class Torch:
  """grpo_step_torch's iteration on the same pipeline."""

  def __init__(self, init_from: str, image_size: int):
    self.transformer, self.vae = ref.load_models(init_from)
    self.work = ref.Work(self.transformer, self.vae, 64, image_size, 10, (0, 2, 4))
    self.optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=1e-4, weight_decay=0.0)

  def run(self, it: int) -> dict:
    t0 = time.perf_counter()
    final, kept = ref.rollout(self.transformer.eval(), self.work, 4.0, 0.8, seed=it)
    t1 = time.perf_counter()
    ref.vae_decode(self.vae, final, self.work)
    t2 = time.perf_counter()
    adv = torch.randn(self.work.batch)
    ref.update(
      self.transformer.train(),
      self.optimizer,
      self.work,
      kept,
      adv,
      noise_level=0.8,
      clip_eps=0.01,
    )
    t3 = time.perf_counter()
    return dict(rollout=t1 - t0, decode=t2 - t1, update=t3 - t2, iteration=t3 - t0)


def jax_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def summarise(ours: list[dict], theirs: list[dict], peaks: dict, flops: dict) -> str:
  med = lambda rows, k: float(np.median([r[k] for r in rows]))
  lines = [
    f"{'part':<22}{'ours s':>9}{'torch s':>9}{'torch/ours':>12}{'(range)':>16}"
    f"{'ours %pk':>10}{'torch %pk':>10}"
  ]
  for k in PARTS:
    ratios = [t[k] / o[k] for o, t in zip(ours, theirs)]
    fo = flops.get(k)
    pk = lambda s, p: f"{fo / s / p:.1%}" if fo else "-"
    label = {"rollout": "rollout (transformer)", "decode": "VAE decode"}.get(k, k)
    lines.append(
      f"{label:<22}{med(ours, k):>9.3f}{med(theirs, k):>9.3f}{np.median(ratios):>12.2f}"
      f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>16}"
      f"{pk(med(ours, k), peaks['jax']):>10}{pk(med(theirs, k), peaks['torch']):>10}"
    )
  lines.append(
    f"ours also: rewards inline {med(ours, 'reward'):.3f} s; collect + update wall "
    f"{med(ours, 'wall'):.3f} s"
  )
  lines.append(
    f"peak (2048^2 f32 matmul, same run): jax {peaks['jax'] / 1e9:.1f} GFLOP/s, torch "
    f"{peaks['torch'] / 1e9:.1f} GFLOP/s; %pk = model FLOPs (XLA cost analysis, per part) / "
    f"seconds / own peak"
  )
  return "\n".join(lines)


def model_flops(ours: Ours) -> dict:
  """FLOPs of the rollout's transformer part and of the update, from XLA's cost analysis."""
  s, rl = ours.s, ours.config.rl
  got = ours.iteration.roll_out(s, ours.state.params, jax.random.key(0), 0, ours.pipeline)
  adv, _ = ours.iteration.advantages(s, got)
  inputs = s.roller.policy_inputs(got.pool_index)
  batch = s.objective.make_batch(s, ours.state.params, got.result, inputs, jnp.asarray(adv))
  update = update_step_flops(s, ours.tx, ours.state, batch)
  per_step = rollout_step_flops(s, ours.state.params)
  if ours.config.model.transformer_overrides.get("scan_layers"):
    return {}  # XLA counts a scanned block once: no honest per-part FLOPs
  # XLA counts a while loop's body once: scale by the N scanned steps.
  rollout = rl.rollout_chunks * rl.num_steps * per_step
  return dict(rollout=rollout, update=update, iteration=rollout + update)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--init_from", default="")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--scan_layers", action="store_true")
  parser.add_argument("--remat_policy", default="none")
  args = parser.parse_args()
  init_from = args.init_from or build_reference_pipeline(tempfile.mkdtemp())
  overrides = dict(scan_layers=args.scan_layers, remat_policy=args.remat_policy)
  ours, theirs = Ours(init_from, args.image_size, overrides), Torch(init_from, args.image_size)
  rows_ours, rows_torch = [], []
  for r in range(args.rounds + 1):  # round 0 compiles and warms up
    o, t = ours.run(r), theirs.run(r)
    if r > 0:
      rows_ours.append(o)
      rows_torch.append(t)
      print(f"round {r}: ours " + " ".join(f"{k} {o[k]:.3f}" for k in PARTS), flush=True)
      print(f"round {r}: torch " + " ".join(f"{k} {t[k]:.3f}" for k in PARTS), flush=True)
  flops = model_flops(ours)
  peaks = dict(jax=jax_matmul_peak(), torch=ref.matmul_peak())
  print(
    f"jax {jax.__version__} ({jax.devices()[0].platform}, XLA_FLAGS="
    f"{os.environ.get('XLA_FLAGS', '')!r}), torch {torch.__version__} "
    f"({torch.get_num_threads()} threads); {len(os.sched_getaffinity(0))} cores in the "
    f"affinity mask; transformer {overrides}; {args.rounds} rounds"
  )
  print(summarise(rows_ours, rows_torch, peaks, flops))


if __name__ == "__main__":
  main()
