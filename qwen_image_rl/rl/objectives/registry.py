"""RL objectives by name: `config.rl.objective` picks one; the RL loop does not know which.

The loop (`rl/iteration.py`) rolls out a batch, scores it, computes advantages and hands the
update to the objective. An objective is a module of `rl/objectives/` that registers an
`Objective` under its name (and is imported by the package's `__init__`):

  records     what the rollout must keep for the update:
                'transitions'    the SDE transitions on the trained steps (x_t, the sample
                                 x_t', both sigmas, the behaviour log-prob): policy-gradient
                                 objectives on the sampler's own Markov chain (GRPO);
                'final_latents'  only the clean final latents x_0 (the rollout then runs the
                                 plain ODE): forward-process objectives (DiffusionNFT, AWM)
                                 that draw fresh (t, eps) and train on x_t = (1 - t) x_0 + t eps.
  make_step   make_step(model, tx, rules, rl, img_shapes) -> step(state, batch, ref_params)
              -> (state, metrics): the update to jit. metrics holds a scalar 'loss'; a
              non-finite loss must leave the state unchanged (train_state.keep_if_finite).
  make_batch  make_batch(policy, params, result, inputs, advantages) -> the step's batch (a dict
              of per-sample arrays) from the rollout result (rl.rollout.RolloutResult), the
              batch-sharded conditioning `inputs` (cond, mask, neg_cond, neg_mask, ref_latents)
              and the advantages [B]. `policy` carries model, rl config, img_shapes, mesh and
              rules, for objectives that need a forward pass first (old log-probs).
  make_grads  make_grads(model, rules, rl, img_shapes) -> grads(params, batch, key) -> (grads,
              metrics): the objective's gradient at `params` with no update (theta_old = theta;
              `key` feeds any draws), for benchmarks of the gradient's signal.
  wrap_optimizer  wrap_optimizer(tx, rl) -> tx (optional, default: tx itself): an objective that
              keeps extra per-run arrays beside the params (an old policy) keeps them in the
              optimiser state, so they are sharded, checkpointed and resumed with it.

`register(objective)` adds one (a second objective of the same name is an error), `get(name)`
returns it or raises KeyError listing the known names, `names()` lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

RECORDS = ("transitions", "final_latents")


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  records: str
  make_step: Callable[..., Callable]
  make_batch: Callable[..., dict[str, Any]]
  make_grads: Callable[..., Callable] | None = None
  wrap_optimizer: Callable[..., Any] = lambda tx, rl: tx

  def __post_init__(self):
    if self.records not in RECORDS:
      raise ValueError(f"objective {self.name!r}: records={self.records!r} is not one of {RECORDS}")


_OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
  if objective.name in _OBJECTIVES:
    raise ValueError(f"objective {objective.name!r} registered twice")
  _OBJECTIVES[objective.name] = objective
  return objective


def get(name: str) -> Objective:
  if name not in _OBJECTIVES:
    raise KeyError(f"unknown RL objective {name!r}; known: {names()}")
  return _OBJECTIVES[name]


def names() -> list[str]:
  return sorted(_OBJECTIVES)
