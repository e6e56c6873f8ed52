"""Reward scoring off the training thread (Qwen-Image-2.0-RL: rewards are computed asynchronously).

The GRPO loop overlaps rollout n+1 with the scoring of rollout n:

  with AsyncRewardPipeline(reward_fn, max_pending=2) as rewards:
    ticket = rewards.submit(rollout(0))
    for n in range(steps):
      next_batch = rollout(n + 1)                 # device work while the worker scores batch n
      next_ticket = rewards.submit(next_batch)
      scored = rewards.result(ticket, expect_sample_ids=ids_n)   # blocks until batch n is done
      train_step(scored.scores, ...)
      ticket = next_ticket

One worker thread scores batches strictly in submission order (FIFO); `workers=N` lets N batches
be scored at once, for a reward that mostly waits on a remote judge (rewards/remote.py), whose
chunks would otherwise queue behind each other's round trips. `submit` copies the batch
(read-only), so the caller may reuse its buffers, and blocks once `max_pending` batches wait, to
bound host memory. Each result carries the sample ids of the batch it scored and is checked
against the ids recorded at submit time, so a score can never move to another sample. A failure
in the worker is raised by `result()` for that ticket (RewardWorkerError, with the worker's
traceback text); other tickets are unaffected. NaN scores ("failed" samples) are counted in
every result and logged (on_nan='warn') or raised (on_nan='raise').

`SyncRewardPipeline` has the same API and scores inside `submit`: for debugging and for
deterministic tests. On multiple hosts each host scores its own samples; the trainer gathers raw
scores across hosts before the group normalisation.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging

from qwen_image_rl.rewards.base import RewardBatch, RewardError, check_scores, nan_counts

ON_NAN_CHOICES = ('warn', 'raise')


class RewardWorkerError(RewardError):
  """The reward function raised while scoring a batch; the message holds the worker traceback."""


class RewardCancelledError(RewardError):
  """The batch was dropped unscored because the pipeline closed with cancel_pending=True."""


@dataclasses.dataclass(frozen=True, eq=False)
class RewardResult(Mapping[str, np.ndarray]):
  """The scores of one submitted batch; a read-only mapping {score name: float32 [B]}.

  Attributes:
    ticket: what `submit` returned.
    scores: {name: float32 [B]} in batch order.
    sample_ids: int64 [B] ids of the scored batch; scores[name][i] belongs to sample_ids[i].
    nan_counts: {name: number of failed (NaN) samples}.
    seconds: wall time the reward function took.
    wait_seconds: how long `result()` blocked the caller (0 when scoring was already done).
    extra_metrics: the reward function's `last_metrics` right after it scored this batch (e.g.
      a remote judge's latency percentiles, retries and failures), or {}.
  """

  ticket: int
  scores: dict[str, np.ndarray]
  sample_ids: np.ndarray
  nan_counts: dict[str, int]
  seconds: float
  wait_seconds: float = 0.0
  extra_metrics: dict[str, float] = dataclasses.field(default_factory=dict)

  def __getitem__(self, name: str) -> np.ndarray:
    return self.scores[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self.scores)

  def __len__(self) -> int:
    return len(self.scores)

  @property
  def num_failed(self) -> int:
    """Samples with at least one NaN score."""
    if not self.scores:
      return 0
    return int(np.any([np.isnan(v) for v in self.scores.values()], axis=0).sum())

  def check_sample_ids(self, expected) -> None:
    expected = np.asarray(expected)
    if expected.shape != self.sample_ids.shape or not np.array_equal(expected, self.sample_ids):
      raise RewardError(
        f'reward result of ticket {self.ticket} is for sample ids '
        f'{_short(self.sample_ids)}, expected {_short(expected)}'
      )

  def metrics(self, prefix: str = 'reward') -> dict[str, float]:
    """Scalars for logging: `<prefix>/<name>/{mean,std,min,max,nan_count}` over finite samples,
    `perf/reward_seconds`, `perf/reward_wait_seconds`, and `extra_metrics`."""
    out = {}
    for name, value in self.scores.items():
      finite = value[np.isfinite(value)]
      stats = (
        (float(finite.mean()), float(finite.std()), float(finite.min()), float(finite.max()))
        if finite.size
        else (float('nan'),) * 4
      )
      for key, stat in zip(('mean', 'std', 'min', 'max'), stats):
        out[f'{prefix}/{name}/{key}'] = stat
      out[f'{prefix}/{name}/nan_count'] = float(self.nan_counts[name])
    out['perf/reward_seconds'] = self.seconds
    out['perf/reward_wait_seconds'] = self.wait_seconds
    out.update(self.extra_metrics)
    return out


def _short(ids) -> str:
  ids = np.asarray(ids).tolist()
  return str(ids) if len(ids) <= 16 else f'{ids[:8]} ... {ids[-4:]} ({len(ids)} ids)'


@dataclasses.dataclass(frozen=True)
class _Failure:
  error: BaseException
  traceback_text: str


class _RewardPipelineBase:
  """Tickets, result bookkeeping and checks shared by the sync and async pipelines."""

  def __init__(
    self,
    reward_fn: Callable[[RewardBatch], Mapping[str, Any]],
    *,
    copy_inputs: bool = True,
    on_nan: str = 'warn',
  ):
    if not callable(reward_fn):
      raise TypeError(f'reward_fn must be callable, got {reward_fn!r}')
    if on_nan not in ON_NAN_CHOICES:
      raise ValueError(f'on_nan={on_nan!r} is not one of {ON_NAN_CHOICES}')
    self.reward_fn = reward_fn
    self.copy_inputs = copy_inputs
    self.on_nan = on_nan
    self._cond = threading.Condition()
    self._next_ticket = 0
    self._outstanding: dict[int, np.ndarray] = {}  # ticket -> sample ids, until retrieved
    self._done: dict[int, RewardResult | _Failure] = {}
    self._closed = False

  # --- scoring (runs in the worker thread for the async pipeline) ----------------------------

  def _score(self, ticket: int, batch: RewardBatch) -> RewardResult | _Failure:
    start = time.perf_counter()
    try:
      scores = self.reward_fn(batch)
      names = tuple(getattr(self.reward_fn, 'names', None) or scores)
      where = f'reward {getattr(self.reward_fn, "name", type(self.reward_fn).__name__)!r}'
      scores = check_scores(scores, names, batch.size, where)
    except Exception as e:  # pylint: disable=broad-except
      return _Failure(e, traceback.format_exc())
    # Read on the thread that scored, before the next batch overwrites it.
    extra = dict(getattr(self.reward_fn, 'last_metrics', None) or {})
    return RewardResult(
      ticket=ticket,
      scores=scores,
      sample_ids=batch.sample_ids,
      nan_counts=nan_counts(scores),
      seconds=time.perf_counter() - start,
      extra_metrics=extra,
    )

  # --- tickets ----------------------------------------------------------------------------

  def _prepare(self, batch: RewardBatch) -> tuple[int, RewardBatch]:
    if not isinstance(batch, RewardBatch):
      raise TypeError(f'submit expects a RewardBatch, got {type(batch).__name__}')
    if self._closed:
      raise RuntimeError(f'{type(self).__name__} is closed; submit before close().')
    if self.copy_inputs:
      batch = batch.frozen_copy()
    with self._cond:
      ticket = self._next_ticket
      self._next_ticket += 1
      self._outstanding[ticket] = batch.sample_ids
    return ticket, batch

  def _store(self, ticket: int, outcome) -> None:
    with self._cond:
      self._done[ticket] = outcome
      self._cond.notify_all()

  def _worker_gone(self) -> bool:
    return False

  @property
  def num_outstanding(self) -> int:
    """Tickets submitted whose result has not been retrieved yet."""
    with self._cond:
      return len(self._outstanding)

  def result(
    self, ticket: int, timeout: float | None = None, expect_sample_ids=None
  ) -> RewardResult:
    """Blocks until `ticket`'s batch is scored and returns its scores (each ticket once).

    Args:
      ticket: from `submit`.
      timeout: seconds to wait; None waits forever.
      expect_sample_ids: if given, the scored batch's sample ids must equal these.

    Raises:
      RewardWorkerError: the reward function raised on this batch (worker traceback included).
      RewardCancelledError: the pipeline was closed with cancel_pending=True before scoring it.
      RewardError: NaN scores with on_nan='raise', or sample ids that do not match.
      TimeoutError: not scored within `timeout`.
      ValueError: unknown or already retrieved ticket.
    """
    start = time.perf_counter()
    with self._cond:
      if ticket not in self._outstanding:
        raise ValueError(
          f'unknown ticket {ticket!r}: never submitted or already retrieved '
          f'(outstanding: {sorted(self._outstanding)})'
        )
      ready = self._cond.wait_for(lambda: ticket in self._done or self._worker_gone(), timeout)
      if not ready:
        raise TimeoutError(f'ticket {ticket} was not scored within {timeout} s')
      if ticket not in self._done:
        raise RewardError(f'the reward worker stopped before scoring ticket {ticket}')
      outcome = self._done.pop(ticket)
      submitted_ids = self._outstanding.pop(ticket)
    wait = time.perf_counter() - start
    if isinstance(outcome, _Failure):
      if isinstance(outcome.error, RewardCancelledError):
        raise outcome.error
      raise RewardWorkerError(
        f'reward function failed on ticket {ticket} (sample ids {_short(submitted_ids)}):\n'
        f'--- worker traceback ---\n{outcome.traceback_text}'
      ) from outcome.error
    outcome = dataclasses.replace(outcome, wait_seconds=wait)
    if not np.array_equal(outcome.sample_ids, submitted_ids):  # bookkeeping bug guard
      raise RewardError(
        f'ticket {ticket}: scored sample ids {_short(outcome.sample_ids)} differ '
        f'from submitted {_short(submitted_ids)}'
      )
    if expect_sample_ids is not None:
      outcome.check_sample_ids(expect_sample_ids)
    self._report_nans(outcome)
    return outcome

  def _report_nans(self, outcome: RewardResult) -> None:
    failed = {name: count for name, count in outcome.nan_counts.items() if count}
    if not failed:
      return
    bad = np.any([np.isnan(outcome.scores[n]) for n in failed], axis=0)
    message = (
      f'ticket {outcome.ticket}: NaN (failed) scores {failed} of '
      f'{outcome.sample_ids.size} samples; failed sample ids '
      f'{_short(outcome.sample_ids[bad])}'
    )
    if self.on_nan == 'raise':
      raise RewardError(message)
    logging.warning('%s', message)

  # --- lifecycle ----------------------------------------------------------------------------

  def close(self, cancel_pending: bool = False, timeout: float | None = None) -> None:
    self._closed = True

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    # On an error, do not wait for queued batches nobody will read.
    self.close(cancel_pending=exc_type is not None)
    return False


class SyncRewardPipeline(_RewardPipelineBase):
  """Same API as AsyncRewardPipeline; `submit` scores right away in the calling thread."""

  def __init__(self, reward_fn, max_pending: int = 2, **kwargs):
    del max_pending  # Accepted so the two pipelines are interchangeable.
    super().__init__(reward_fn, **kwargs)

  def submit(self, batch: RewardBatch, timeout: float | None = None) -> int:
    del timeout
    ticket, batch = self._prepare(batch)
    self._store(ticket, self._score(ticket, batch))
    return ticket


_STOP = object()


class AsyncRewardPipeline(_RewardPipelineBase):
  """Scores submitted batches in FIFO order on one background thread (or `workers` threads).

  Args:
    reward_fn: `fn(RewardBatch) -> {name: [B]}`, e.g. a RewardFn or CompositeReward. Called only
      from the worker threads; with workers=1 one batch at a time.
    max_pending: batches that may wait unscored (not counting those being scored); `submit`
      blocks beyond that.
    copy_inputs: submit a private read-only copy of the batch (the caller may reuse buffers).
    on_nan: 'warn' logs NaN scores; 'raise' makes `result()` raise RewardError.
    workers: threads scoring batches; > 1 overlaps batches whose scoring mostly waits (a remote
      judge's round trips), and then reward_fn is called concurrently (it must be thread-safe;
      batches start in FIFO order but may finish in any order; each result stays with its
      ticket).
  """

  def __init__(
    self,
    reward_fn,
    max_pending: int = 2,
    *,
    copy_inputs: bool = True,
    on_nan: str = 'warn',
    thread_name: str = 'reward-worker',
    workers: int = 1,
  ):
    super().__init__(reward_fn, copy_inputs=copy_inputs, on_nan=on_nan)
    if not isinstance(max_pending, int) or max_pending < 1:
      raise ValueError(f'max_pending={max_pending!r} must be an int >= 1')
    if not isinstance(workers, int) or workers < 1:
      raise ValueError(f'workers={workers!r} must be an int >= 1')
    self.max_pending = max_pending
    self.workers = workers
    self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
    self._cancel = threading.Event()
    self._exited = False
    self._running = workers
    self._threads = [
      threading.Thread(
        target=self._run, daemon=True, name=thread_name if workers == 1 else f'{thread_name}-{i}'
      )
      for i in range(workers)
    ]
    self._thread = self._threads[0]  # with workers=1 the only one
    for thread in self._threads:
      thread.start()

  def _run(self) -> None:
    try:
      while True:
        item = self._queue.get()
        if item is _STOP:
          return
        ticket, batch = item
        if self._cancel.is_set():
          error = RewardCancelledError(
            f'ticket {ticket} was cancelled by close(cancel_pending=True) before it was scored'
          )
          self._store(ticket, _Failure(error, ''))
        else:
          self._store(ticket, self._score(ticket, batch))
    finally:
      with self._cond:
        self._running -= 1
        self._exited = self._running == 0
        self._cond.notify_all()

  def _worker_gone(self) -> bool:
    return self._exited

  def submit(self, batch: RewardBatch, timeout: float | None = None) -> int:
    """Queues `batch` for scoring and returns its ticket; blocks while max_pending wait.

    Raises:
      TimeoutError: the queue stayed full for `timeout` seconds (the batch is not queued).
      RuntimeError: the pipeline is closed or its worker has stopped.
    """
    if self._exited and not self._closed:
      raise RuntimeError('the reward worker thread has stopped; create a new pipeline.')
    ticket, batch = self._prepare(batch)
    try:
      self._queue.put((ticket, batch), timeout=timeout)
    except queue.Full:
      with self._cond:
        self._outstanding.pop(ticket, None)
      raise TimeoutError(
        f'{self.max_pending} batches still waiting after {timeout} s; '
        f'retrieve results or raise max_pending'
      ) from None
    return ticket

  @property
  def num_queued(self) -> int:
    """Batches waiting for the worker (not counting the one being scored)."""
    return self._queue.qsize()

  def close(self, cancel_pending: bool = False, timeout: float | None = None) -> None:
    """Stops the worker after the queued batches (or, with cancel_pending, drops them) and joins.

    Results already scored can still be retrieved after close. Idempotent.

    Raises:
      TimeoutError: the worker did not finish within `timeout` seconds.
    """
    if cancel_pending:
      self._cancel.set()
    if not self._closed:
      self._closed = True
      stops = 0  # one per worker; the workers drain the queue, so slots free up
      while stops < self.workers and not self._exited:
        try:
          self._queue.put(_STOP, timeout=0.1)
          stops += 1
        except queue.Full:
          continue
    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in self._threads:
      thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in self._threads):
      raise TimeoutError(f'the reward worker did not stop within {timeout} s (still scoring)')
