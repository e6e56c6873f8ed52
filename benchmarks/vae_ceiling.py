"""The oracle on a tiny VAE's reconstructions: the ceiling any generator in its latent space has.

  python benchmarks/vae_ceiling.py --vae=runs/demo/vae/export/vae [--n=256] [--json=PATH]

Encodes and decodes the held-out val renders (the VAE stage's own eval set: seed 0, 64 px) and
scores the reconstructions with the current oracle: rubric-capped, uncapped mean and strict per
category, every dimension, and the identity of each reconstructed portrait against its source
render (what the edit identity metric compares). This is how the VAE stage's numbers were
diagnosed (which category and which dimension lose most).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reconstruct(vae_dir: str, images: np.ndarray, batch: int = 64) -> np.ndarray:
  import jax

  from qwen_image_rl.convert.vae import load_vae
  from qwen_image_rl.data import examples

  model, variables = load_vae(vae_dir)
  encode = jax.jit(lambda p, x: model.apply(p, x, method=model.encode))
  decode = jax.jit(lambda p, z: model.apply(p, z, method=model.decode))
  x = examples.to_model_range(images)
  out = [
    np.asarray(decode(variables, encode(variables, x[i : i + batch])))
    for i in range(0, len(x), batch)
  ]
  return examples.to_uint8(np.concatenate(out))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vae", required=True, help="an exported vae/ directory")
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  if not os.path.isfile(os.path.join(args.vae, "config.json")):
    parser.error(f"--vae={args.vae!r} has no config.json (pass WORKDIR/vae/export/vae)")

  from qwen_image_rl import evaluation
  from qwen_image_rl.data import examples, oracle

  ex = examples.t2i_examples(0, args.n, "val", 64)
  recon = reconstruct(args.vae, ex.images)
  scores, checks = oracle.score_and_check_t2i_batch(recon, ex.specs)
  out = evaluation.summarise_t2i(scores, ex.categories, checks)
  out["identity_vs_source"] = float(
    np.mean(
      [
        oracle.identity_similarity(a, b)
        for a, b, c in zip(ex.images, recon, ex.categories)
        if c == "portrait"
      ]
    )
  )
  out["psnr"] = float(
    10
    * np.log10(255.0**2 / np.mean((recon.astype(np.float64) - ex.images.astype(np.float64)) ** 2))
  )
  print(json.dumps(out, indent=1, sort_keys=True))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
  main()
