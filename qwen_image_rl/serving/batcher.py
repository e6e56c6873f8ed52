"""Concurrent requests into batched judge calls: an asyncio queue drained by one batching task.

The first waiting request opens a batch; those queued while the previous batch was being judged
join it at once, and those arriving within `max_wait_s` more (until `max_batch`) too; the judge
scores the batch on one executor thread (so the event loop keeps accepting requests while it
runs) and each request's future gets its reply. A judge exception
fails every request of that batch and nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from typing import Any


class Batcher:
  """`await batcher.submit(item)` -> `score_fn([items...])[i]`, batched across callers."""

  def __init__(
    self, score_fn: Callable[[Sequence[Any]], list], max_batch: int = 32, max_wait_s: float = 0.002
  ):
    if max_batch < 1:
      raise ValueError(f'max_batch={max_batch} must be >= 1')
    self._score_fn = score_fn
    self.max_batch = max_batch
    self.max_wait_s = max_wait_s
    self._queue: asyncio.Queue = asyncio.Queue()
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='judge')
    self._task: asyncio.Task | None = None
    self.stats = {'batches': 0, 'requests': 0, 'max_batch_seen': 0, 'judge_seconds': 0.0}

  def start(self) -> None:
    self._task = asyncio.get_running_loop().create_task(self._run())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    self._executor.shutdown(wait=True)

  async def submit(self, item: Any) -> Any:
    future = asyncio.get_running_loop().create_future()
    await self._queue.put((item, future))
    return await future

  async def _collect(self) -> list:
    batch = [await self._queue.get()]
    while len(batch) < self.max_batch and not self._queue.empty():  # arrived while judging
      batch.append(self._queue.get_nowait())
    deadline = time.monotonic() + self.max_wait_s
    while len(batch) < self.max_batch and self.max_wait_s > 0:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        break
      try:
        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
      except TimeoutError:
        break
    return [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled callers

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = await self._collect()
      if not batch:
        continue
      items = [item for item, _ in batch]
      start = time.perf_counter()
      try:
        replies = await loop.run_in_executor(self._executor, self._score_fn, items)
        if len(replies) != len(items):
          raise RuntimeError(f'judge returned {len(replies)} replies for {len(items)} requests')
      except Exception as e:  # pylint: disable=broad-except
        for _, fut in batch:
          if not fut.done():
            fut.set_exception(e)
        continue
      finally:
        self.stats['judge_seconds'] += time.perf_counter() - start
      self.stats['batches'] += 1
      self.stats['requests'] += len(items)
      self.stats['max_batch_seen'] = max(self.stats['max_batch_seen'], len(items))
      for (_, fut), reply in zip(batch, replies):
        if not fut.done():
          fut.set_result(reply)
