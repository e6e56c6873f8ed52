"""Float32 master weights with bf16 compute.

A bf16 weight keeps 8 significant bits: an AdamW step of lr 1e-5 (Adam's first step moves every
weight by about lr) is below half an ulp for any |w| above ~2.6e-3, so it rounds away. For
N(0, 0.02) weights only ~15% change at all (`tests/test_precision.py` measures 15.5%).

The fix is the usual one: parameters, and therefore the optimiser moments optax builds from
them, stay float32; the model computes in bf16. Our modules already separate the two:
`param_dtype` is the storage dtype and `dtype` the compute dtype (every `dense`/norm casts its
float32 parameters to `dtype` inside the apply, and the cast fuses into the matmul), so master
weights need no second copy of the tree in the train step: gradients arrive in float32 and the
update is exact to float32.

What a trainer calls:
  dtypes = precision.model_dtypes(config)         # {'dtype': bf16, 'param_dtype': f32}
  model, params = load_transformer(dir, **dtypes, **overrides)   # or Model(**dtypes, ...)
  tx = optim.make_optimizer(config.optim, steps)  # unchanged: moments follow the f32 params
  precision.check_master_params(params, dtypes)   # fail early if a leaf is not f32
  ... and for a bf16 copy (rollout sampler, export in the released bf16 format):
  precision.cast_floating(params, dtypes['dtype'])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SETTINGS = ("auto", "on", "off")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def master_weights_enabled(compute_dtype, setting: str = "auto") -> bool:
  """'auto' keeps float32 masters exactly when the compute dtype is narrower than float32."""
  if setting not in SETTINGS:
    raise ValueError(f"config.model.master_weights={setting!r}: expected one of {list(SETTINGS)}")
  if setting == "auto":
    return jnp.dtype(compute_dtype).itemsize < 4
  return setting == "on"


def model_dtypes(config) -> dict[str, Any]:
  """{'dtype': compute dtype, 'param_dtype': storage dtype} from `config.model`.

  Reads `config.model.dtype` (a name in DTYPES) and `config.model.master_weights` ('auto' when
  absent).
  """
  name = config.model.dtype
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype={name!r}: expected one of {list(DTYPES)}")
  compute = DTYPES[name]
  setting = config.model.get("master_weights", "auto")
  storage = jnp.float32 if master_weights_enabled(compute, setting) else compute
  return {"dtype": compute, "param_dtype": storage}


def cast_floating(tree, dtype):
  """`tree` with every floating-point leaf cast to `dtype` (integer leaves untouched)."""

  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(cast, tree)


def check_master_params(params, dtypes: dict[str, Any]) -> None:
  """Raise if a floating-point parameter is not stored in `dtypes['param_dtype']`."""
  want = jnp.dtype(dtypes["param_dtype"])
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  wrong = [
    f"{jax.tree_util.keystr(p)} ({x.dtype})"
    for p, x in flat
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype) != want
  ]
  if wrong:
    raise ValueError(
      f"parameters must be stored as {want} (master weights) but "
      f"{len(wrong)} are not, e.g. {', '.join(wrong[:5])}; build the model with "
      f"param_dtype={want} or load the checkpoint with it"
    )


def fraction_changed(old, new) -> float:
  """The fraction of floating-point parameter entries that differ between two trees."""
  changed = total = 0
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      changed += int(np.count_nonzero(np.asarray(a) != np.asarray(b)))
      total += int(np.size(a))
  return changed / max(total, 1)
