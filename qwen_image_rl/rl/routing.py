"""Which task an iteration trains when one run serves two (OPD's teacher routing, Mix-RL)."""

from __future__ import annotations

import numpy as np

TASKS = ("t2i", "edit")


def route_task(seed: int, iteration: int, t2i_fraction: float, block: int = 1) -> str:
  """The task of an iteration's batch.

  Iterations come in blocks of `block` of one task (fewer teacher swaps). Block j is T2I iff
  floor((j + 1) f + u) - floor(j f + u) = 1, with f = t2i_fraction and u in [0, 1) drawn from
  the seed: every window of n blocks holds n f T2I blocks to within one (the ratio is exact
  over any stretch of the run, not only in expectation), in a seed-dependent phase.
  """
  u = np.random.default_rng([seed, 11]).random()
  j = iteration // max(int(block), 1)
  return "t2i" if np.floor((j + 1) * t2i_fraction + u) - np.floor(j * t2i_fraction + u) else "edit"
