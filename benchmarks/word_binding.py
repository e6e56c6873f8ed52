"""How much of one word's effect on the image a pipeline reproduces, word kind by word kind.

  python benchmarks/word_binding.py --pipeline=WORKDIR/base [--n=32] [--json=PATH]

For each kind of word (a glyph, a portrait's expression, a landscape's sun or moon, ... and
large-area controls: hair colour, glasses, the sky) it takes n held-out scenes, changes only that
attribute (scene A -> scene B), captions both with the same phrasing and samples both with the
same initial noise (CFG 4, 20 steps). Per kind it prints:

- `reproduced`: the slope of the samples' change on the renders' change,
  sum <x_A - x_B, r_A - r_B> / sum |r_A - r_B|^2, with its standard error over pairs. 1: the
  sample changes exactly as the world does when the word changes; 0: the word is ignored (the
  image changes only with the noise).
- `cosine`: the cosine of the two changes (direction, whatever the size).
- `noise / word`: sum |x_A(z) - x_A(z')|^2 / sum |r_A - r_B|^2, how much a new noise draw moves
  the sample compared with what the word should move.

A strict rate needs every word bound; this says which ones the generator does not bind yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen_image_rl.data import world as W


def binding(samples_a, samples_b, renders_a, renders_b, samples_a_renoised=None) -> dict:
  """The module docstring's figures for one kind of word; images [N, H, W, C], any range."""
  dx = np.asarray(samples_a, np.float64) - np.asarray(samples_b, np.float64)
  dr = np.asarray(renders_a, np.float64) - np.asarray(renders_b, np.float64)
  along = np.sum((dx * dr).reshape(len(dr), -1), axis=1)  # per pair
  word_per_pair = np.sum((dr * dr).reshape(len(dr), -1), axis=1)
  word = float(word_per_pair.sum())
  if word == 0.0:
    raise ValueError("the renders of A and B are identical: the attribute changes nothing")
  reproduced = float(along.sum()) / word
  # Standard error of the ratio estimator over pairs (delta method).
  n = len(dr)
  spread = np.sum((along - reproduced * word_per_pair) ** 2) * n / max(n - 1, 1)
  out = {
    "reproduced": reproduced,
    "reproduced_se": float(np.sqrt(spread)) / word,
    "cosine": float(along.sum()) / max(float(np.sqrt(np.sum(dx * dx) * word)), 1e-12),
  }
  if samples_a_renoised is not None:
    dn = np.asarray(samples_a, np.float64) - np.asarray(samples_a_renoised, np.float64)
    out["noise / word"] = float(np.sum(dn * dn)) / word
  return out


def _other(rng, options, current):
  return rng.choice([o for o in options if o != current])


def _swap_glyph(spec, rng):
  k = int(rng.integers(len(spec.text)))
  text = spec.text[:k] + _other(rng, W.GLYPHS, spec.text[k]) + spec.text[k + 1 :]
  return dataclasses.replace(spec, text=text)


def _swap_shape(field: str):
  def swap(spec, rng):
    first = spec.shapes[0]
    if field == "colour":
      taken = {s.colour for s in spec.shapes}
      value = rng.choice([c for c in W.SHAPE_COLOURS if c not in taken])
    else:
      value = _other(rng, W.SHAPE_KINDS, first.kind)
    shapes = (dataclasses.replace(first, **{field: str(value)}),) + spec.shapes[1:]
    return dataclasses.replace(spec, shapes=shapes)

  return swap


def _swap(field: str, options):
  def swap(spec, rng):
    value = _other(rng, list(options), getattr(spec, field))
    return dataclasses.replace(spec, **{field: value.item() if hasattr(value, "item") else value})

  return swap


# kind -> (category, scene A -> scene B); the last three are large-area controls.
KINDS = {
  "typography/glyph": ("typography", _swap_glyph),
  "typography/colour": ("typography", _swap("colour", W.TEXT_COLOURS)),
  "general/shape colour": ("general", _swap_shape("colour")),
  "general/shape kind": ("general", _swap_shape("kind")),
  "portrait/expression": ("portrait", _swap("expression", W.EXPRESSIONS)),
  "portrait/eyes": ("portrait", _swap("eyes", W.EYE_COLOURS)),
  "landscape/sun or moon": ("landscape", _swap("body", W.BODIES)),
  "landscape/body position": ("landscape", _swap("body_pos", W.BODY_POSITIONS)),
  "portrait/hair (control)": ("portrait", _swap("hair", W.HAIR_COLOURS)),
  "portrait/glasses (control)": ("portrait", _swap("glasses", (True, False))),
  "landscape/sky (control)": ("landscape", _swap("sky", W.SKY_COLOURS)),
}


def scene_pairs(kind: str, n: int, seed: int = 0):
  """n held-out (val) scenes of the kind's category and their one-attribute changes."""
  category, swap = KINDS[kind]
  rng = np.random.default_rng(seed)
  scenes_a = W.sample_scenes(seed, n, (category,), "val")
  return scenes_a, [swap(s, rng) for s in scenes_a]


def measure(pipe, kind: str, n: int, cfg, seed: int = 0) -> tuple[dict, np.ndarray]:
  """(the figures, a [4, n, H, W, C] uint8 stack: render A, sample A, render B, sample B)."""
  from qwen_image_rl import evaluation
  from qwen_image_rl.data import captions, render

  scenes_a, scenes_b = scene_pairs(kind, n, seed)
  # The same phrasing for A and B: each pair's caption draws from one seeded generator.
  prompts = [
    [captions.prompt(s, np.random.default_rng(seed + i)).text for i, s in enumerate(scenes)]
    for scenes in (scenes_a, scenes_b)
  ]
  x_a = evaluation.sample_t2i(pipe, prompts[0], cfg, seed)
  x_b = evaluation.sample_t2i(pipe, prompts[1], cfg, seed)
  x_a2 = evaluation.sample_t2i(pipe, prompts[0], cfg, seed + 10_000)
  r_a, r_b = (render.render_batch(scenes, cfg.image_size) for scenes in (scenes_a, scenes_b))
  figures = binding(x_a / 255.0, x_b / 255.0, r_a / 255.0, r_b / 255.0, x_a2 / 255.0)
  return figures, np.stack([r_a, x_a, r_b, x_b])


def pairs_grid(stacks: dict, pairs: int = 4, scale: int = 1) -> np.ndarray:
  """One row per kind: for each of its first `pairs` pairs, render A, sample A, render B,
  sample B (the samples from the same noise)."""
  from qwen_image_rl import metrics

  rows = [
    np.concatenate(list(stack[:, :pairs].transpose(1, 0, 2, 3, 4))) for stack in stacks.values()
  ]
  images = np.concatenate(rows).repeat(scale, axis=1).repeat(scale, axis=2)
  return metrics.image_grid(images, len(rows[0]), pad=2, pad_value=255)


def table(results: dict) -> str:
  lines = ["| word | reproduced | cosine | noise / word |", "|---|---|---|---|"]
  for kind, r in results.items():
    lines.append(
      f"| {kind} | {r['reproduced']:.2f} +- {r['reproduced_se']:.2f} | {r['cosine']:.2f} "
      f"| {r['noise / word']:.1f} |"
    )
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pipeline", required=True, help="an exported pipeline or its workdir")
  parser.add_argument("--n", type=int, default=32, help="scene pairs per kind of word")
  parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--num_steps", type=int, default=20)
  parser.add_argument("--json", default=None, help="also write the figures here")
  parser.add_argument("--out", default=None, help="also write a PNG of each kind's first pairs")
  args = parser.parse_args(argv)
  kinds = [k for k in args.kinds.split(",") if k]
  unknown = [k for k in kinds if k not in KINDS]
  if unknown or not kinds:
    parser.error(f"--kinds: unknown {unknown}; known: {list(KINDS)}")
  if args.n < 1:
    parser.error(f"--n={args.n}: need at least one scene pair per kind")

  from configs import common as config_common
  from qwen_image_rl import sample_grid

  try:
    pipe, _ = sample_grid.load_pipelines(args.pipeline)
  except FileNotFoundError as e:
    parser.error(str(e))
  cfg = config_common.tiny_eval(args.n, 0)
  cfg.image_size, cfg.num_steps = args.image_size, args.num_steps
  results, stacks = {}, {}
  for kind in kinds:
    print(f"{kind}: sampling {args.n} pairs ...", flush=True)
    results[kind], stacks[kind] = measure(pipe, kind, args.n, cfg)
  print(table(results), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  if args.out:
    from PIL import Image

    Image.fromarray(pairs_grid(stacks)).save(args.out, optimize=True)
    print(f"wrote {args.out}: per kind, render A | sample A | render B | sample B", flush=True)
  return results


if __name__ == "__main__":
  main()
