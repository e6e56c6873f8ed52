"""How far RL moved a policy from its base, branch by branch, and what that does under CFG.

  python benchmarks/policy_drift.py --base=runs/demo/base/export/pipeline \
      --policy=runs/curves_edit/nft --policy=runs/curves_edit/nft@placebo [--task=edit] \
      [--n=64] [--cfg_scales=1,2,4,8]

Hybrid CFG trains the conditional velocity only, yet samples with true CFG,
v = v_u + s (v_c - v_u) (norm-rescaled), which is most sensitive to the gap v_c - v_u. At
held-out states x_t = (1 - t) x0 + t eps (x0: the held-out renders; edits: the target images,
with the source as reference) this prints, per policy and t, the relative change from the base
of the conditional velocity |v_c - v_c0| / |v_c0|, of the unconditional (empty prompt) one and
of the gap |g - g0| / |g0|, and the gap's norm ratio |g| / |g0| (batch means of per-sample
norms). A control run (`nft@placebo`: advantages shuffled within groups) shows how much of that
movement the optimiser's noise makes on its own. Then, for the base and every policy, the
held-out oracle at each --cfg_scales (T2I: capped overall; edits: instruction following,
preservation, identity and the mean absolute pixel difference to the source).

--random_like=POLICY adds a second control, `random~POLICY`: the base plus a random Gaussian
direction with the same norm per parameter tensor as POLICY - base. If it costs the held-out
oracle as much as POLICY's own motion, only the size of the motion matters (the base is that
fragile); if it costs far less, the motion has a direction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

TIMES = (0.95, 0.7, 0.4)


def load(policy: str, task: str, flag: str):
  """The task's pipeline, built as the RL trainers and the evaluation build it."""
  from qwen_image_rl.rl.policy import load_exported

  t2i, edit = load_exported(policy, flag, SystemExit)
  return t2i if task == "t2i" else edit


def eval_config(task: str, n: int):
  from configs import common

  cfg = common.tiny_eval()
  cfg.num_t2i, cfg.num_edits = (n, 0) if task == "t2i" else (0, n)
  return cfg


def probe_inputs(base, task: str, n: int, seed: int = 0) -> dict:
  """Clean latents x0, noise, prompt and empty-prompt conditioning, reference latents."""
  from qwen_image_rl import evaluation
  from qwen_image_rl.data.examples import to_model_range
  from qwen_image_rl.pipelines import common as pipe_common
  from qwen_image_rl.rl.prompts import encode_with

  def packed(images):
    z = pipe_common.encode_normalized(base.vae, base.vae_params, to_model_range(images))
    return pipe_common.pack_latents(z), pipe_common.img_shape(z.shape[1], z.shape[2])

  cfg = eval_config(task, n)
  t2i, edits = evaluation.eval_sets(cfg, seed)
  x0, shape = packed(t2i.images if task == "t2i" else edits.targets)
  texts = list(t2i.prompts if task == "t2i" else edits.instructions)
  cond, mask = encode_with(base, texts, cfg.max_text_tokens)
  neg, neg_mask = encode_with(base, [cfg.negative_prompt], cfg.max_text_tokens)
  return dict(
    x0=x0,
    eps=jax.random.normal(jax.random.key(seed), x0.shape),
    cond=cond,
    mask=mask,
    neg=np.repeat(neg, len(texts), 0),
    neg_mask=np.repeat(neg_mask, len(texts), 0),
    ref=packed(edits.sources)[0] if task == "edit" else None,
    img_shapes=(shape, shape) if task == "edit" else (shape,),
  )


def branch_velocities(model, params, inputs, t: float):
  """(conditional, unconditional) velocities [B, S, C] at x_t."""
  from qwen_image_rl.sampling.guidance import guided_velocity

  x = (1.0 - t) * inputs["x0"] + t * inputs["eps"]

  def one(cond, mask):
    v = guided_velocity(
      model, params, x, t, cond, mask, img_shapes=inputs["img_shapes"], ref_latents=inputs["ref"]
    )
    return np.asarray(v, np.float64)

  return one(inputs["cond"], inputs["mask"]), one(inputs["neg"], inputs["neg_mask"])


def mean_norm(a: np.ndarray) -> float:
  return float(np.linalg.norm(a.reshape(len(a), -1), axis=1).mean())


def drift(base_v, policy_v) -> dict:
  """Relative changes of the two branches and of their gap (module docstring)."""
  (c0, u0), (c1, u1) = base_v, policy_v
  g0, g1 = c0 - u0, c1 - u1
  return dict(
    cond_change=round(mean_norm(c1 - c0) / mean_norm(c0), 4),
    uncond_change=round(mean_norm(u1 - u0) / mean_norm(u0), 4),
    gap_change=round(mean_norm(g1 - g0) / mean_norm(g0), 4),
    gap_norm_ratio=round(mean_norm(g1) / mean_norm(g0), 4),
  )


def heldout_at_scale(pipe, task: str, n: int, scale: float, seed: int = 0) -> dict:
  from qwen_image_rl import evaluation
  from qwen_image_rl.data import oracle

  cfg = eval_config(task, n)
  cfg.cfg_scale = scale
  if task == "t2i":
    r = evaluation.evaluate(pipe, None, cfg, step=0, seed=seed)["t2i"]
    return dict(overall=round(r["overall"], 4), strict=round(r["strict"], 4))
  # Edits sample here rather than through `evaluate`, which keeps no outputs to compare with
  # the sources.
  _, edits = evaluation.eval_sets(cfg, seed)
  out = evaluation.sample_edits(pipe, edits.sources, edits.instructions, cfg, seed)
  scores = oracle.score_edit_batch(edits.sources, out, edits.edits)
  r = evaluation.summarise_edits(scores, edits.edits)
  l1 = np.abs(out.astype(np.float64) - edits.sources.astype(np.float64)).mean()
  return dict(
    instruction_following=round(r["instruction_following"], 4),
    preservation=round(r["preservation"], 4),
    identity=round(r["identity"], 4),
    l1_to_source=round(float(l1), 2),
  )


def random_like(base_params, policy_params, seed: int = 0):
  """base + a random direction with the norm of policy - base in every parameter tensor."""
  base_leaves, treedef = jax.tree.flatten(base_params)
  policy_leaves = treedef.flatten_up_to(policy_params)
  rng = np.random.default_rng(seed)
  out = []
  for b, p in zip(base_leaves, policy_leaves):
    b = np.asarray(b, np.float32)
    direction = rng.standard_normal(b.shape).astype(np.float32)
    scale = np.linalg.norm(np.asarray(p, np.float32) - b) / max(np.linalg.norm(direction), 1e-12)
    out.append(b + scale * direction)
  return jax.tree.unflatten(treedef, out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--base", required=True, help="the base's exported pipeline (or workdir)")
  parser.add_argument("--policy", action="append", required=True, help="a trained policy")
  parser.add_argument("--task", default="edit", choices=("t2i", "edit"))
  parser.add_argument("--n", type=int, default=64, help="held-out prompts / edits")
  parser.add_argument("--cfg_scales", default="1,4", help="comma-separated; empty: none")
  parser.add_argument(
    "--random_like", action="append", default=[], help="a --policy to add a random control for"
  )
  args = parser.parse_args()
  if set(args.random_like) - set(args.policy):
    raise SystemExit(
      f"--random_like {sorted(set(args.random_like) - set(args.policy))}: not a --policy"
    )
  if args.n < 1:
    raise SystemExit("--n must be >= 1")
  scales = [float(s) for s in args.cfg_scales.split(",") if s]
  base = load(args.base, args.task, "--base")
  inputs = probe_inputs(base, args.task, args.n)
  model = base.transformer
  base_v = {t: branch_velocities(model, base.transformer_params, inputs, t) for t in TIMES}
  policies = {path: load(path, args.task, "--policy") for path in args.policy}
  from qwen_image_rl.rl.policy import with_params

  for path in args.random_like:
    params = random_like(base.transformer_params, policies[path].transformer_params)
    policies[f"random~{path}"] = with_params(base, params)
  for path, pipe in policies.items():
    for t in TIMES:
      row = drift(base_v[t], branch_velocities(model, pipe.transformer_params, inputs, t))
      print(json.dumps(dict(policy=path, t=t, **row)), flush=True)
  for path, pipe in {args.base: base, **policies}.items():
    for scale in scales:
      row = heldout_at_scale(pipe, args.task, args.n, scale)
      print(json.dumps(dict(policy=path, cfg_scale=scale, **row)), flush=True)


if __name__ == "__main__":
  main()
