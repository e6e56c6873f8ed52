"""Bradley-Terry ratings from pairwise battles, on the Elo scale, with bootstrap intervals.

A battle is (a, b, s) with s = 1 when player a wins, 0 when b wins and 0.5 for a tie. The model
says P(a beats b) = sigmoid(theta_a - theta_b); a tie counts as half a win for each side, the
usual way arenas fold ties into the likelihood. We maximise

  sum_battles [s log sigmoid(theta_a - theta_b) + (1 - s) log sigmoid(theta_b - theta_a)]
      - prior / 2 * |theta|^2

by Newton's method (the objective is concave; the small Gaussian prior makes it strictly so
when a player won or lost every battle, and fixes the free offset). Ratings are reported as
Elo = 1000 + 400 / ln(10) * theta, centred on the players' mean: a 400-point gap is 10:1 odds.
Intervals are percentiles of the ratings refitted on battles resampled with replacement.
"""

from __future__ import annotations

import math

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)
ELO_CENTRE = 1000.0


def _as_battles(battles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  arr = np.asarray(battles, np.float64).reshape(-1, 3)
  a, b, s = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2]
  if np.any(a == b):
    raise ValueError("a battle needs two different players")
  if np.any((s < 0) | (s > 1)):
    raise ValueError("battle outcomes must lie in [0, 1] (1: first player wins, 0.5: tie)")
  return a, b, s


def fit_bradley_terry(
  battles, num_players: int, *, prior: float = 1e-2, iterations: int = 50
) -> np.ndarray:
  """Maximum a posteriori log-strengths theta [num_players], centred to mean 0."""
  a, b, s = _as_battles(battles)
  theta = np.zeros(num_players)
  eye = np.eye(num_players)
  for _ in range(iterations):
    p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
    residual = s - p
    grad = -prior * theta
    np.add.at(grad, a, residual)
    np.add.at(grad, b, -residual)
    weight = p * (1.0 - p)
    hess = -prior * eye
    np.add.at(hess, (a, a), -weight)
    np.add.at(hess, (b, b), -weight)
    np.add.at(hess, (a, b), weight)
    np.add.at(hess, (b, a), weight)
    step = np.linalg.solve(hess, grad)
    theta = theta - step
    if np.max(np.abs(step)) < 1e-10:
      break
  return theta - theta.mean()


def to_elo(theta: np.ndarray) -> np.ndarray:
  return ELO_CENTRE + ELO_SCALE * np.asarray(theta)


def bootstrap_elo(
  battles, num_players: int, *, rounds: int = 200, seed: int = 0, level: float = 0.95
) -> dict:
  """Elo point estimates and percentile intervals from `rounds` resamples of the battles."""
  arr = np.asarray(battles, np.float64).reshape(-1, 3)
  if len(arr) == 0:
    raise ValueError("no battles to rate")
  rng = np.random.default_rng(seed)
  samples = np.stack(
    [
      to_elo(fit_bradley_terry(arr[rng.integers(0, len(arr), len(arr))], num_players))
      for _ in range(rounds)
    ]
  )
  tail = 100.0 * (1.0 - level) / 2.0
  return dict(
    elo=to_elo(fit_bradley_terry(arr, num_players)),
    low=np.percentile(samples, tail, axis=0),
    high=np.percentile(samples, 100.0 - tail, axis=0),
  )


def win_rates(battles, num_players: int) -> np.ndarray:
  """Mean score of each player over its battles (ties count 0.5)."""
  a, b, s = _as_battles(battles)
  won = np.zeros(num_players)
  played = np.zeros(num_players)
  np.add.at(won, a, s)
  np.add.at(won, b, 1.0 - s)
  np.add.at(played, a, 1.0)
  np.add.at(played, b, 1.0)
  return np.divide(won, played, out=np.full(num_players, np.nan), where=played > 0)
