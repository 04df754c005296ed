"""Prepares the next global batches on a background thread while the device
runs the current step, so the train loop never waits on the host.

    with BatchPrefetcher(source, prepare, first_step=0, num_steps=N,
                         pauses_after=lambda step: step % 100 == 0) as batches:
      for batch in batches:                    # PreparedBatch(step, arrays, num_tokens)
        state = train_step(state, batch.arrays)
        if batch.step % 100 == 0:
          checkpointer.save(batch.step, state, source)   # the source's position is exact
          batches.resume()

Exact resume needs the data source's saved position to be the one after
the batches the saved state has trained on. The producer therefore pauses
after the batch of every step at which the consumer may save
(`pauses_after`) until `resume()`, and `stop()` ends production without
reading further, so that after draining the queue the source's position is
again the consumer's (preemption: train what was prefetched, then save).

A signal must be honoured even while the loop waits on a slow or stuck input
pipeline: `interrupted()` is polled while waiting, and once stopped, a
producer still inside a read after `stop_grace_s` is abandoned (it is a
daemon thread) and `consistent` turns False: the source's position is then
mid-read and must not be saved.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Iterator

# How often a blocked producer looks at the stop flag, seconds.
_POLL_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
  """The inputs of one train step. step: the step count after it (1-based)."""
  step: int
  arrays: Any  # The global batch (jax.Arrays), already on the devices.
  num_tokens: int  # Non-padding tokens of this host's rows.


@dataclasses.dataclass(frozen=True)
class _Failed:
  error: BaseException


_END = object()
# How long a stopped producer may take to finish the read it is in.
STOP_GRACE_SECONDS = 30.0


class BatchPrefetcher:
  """An iterator of PreparedBatch filled by a daemon thread, `depth` ahead.

  source: iterator of host-local batches (e.g. MultimodalInput).
  prepare: local batch -> (global batch arrays, num_tokens); runs on the
    producer thread (host-side checks, device transfer).
  first_step, num_steps: the batches of steps first_step + 1 .. num_steps.
  pauses_after: step -> whether to wait for resume() after that step's batch.
  Iteration ends at num_steps, when the source is exhausted (then
  `exhausted` is True), or after stop() once the queue is drained. An error
  of the source or of `prepare` is raised by the iteration, in order.
  """

  def __init__(self, source: Iterator[Any], prepare: Callable[[Any], tuple[Any, int]],
               first_step: int, num_steps: int, pauses_after: Callable[[int], bool],
               depth: int = 2, interrupted: Callable[[], bool] = lambda: False,
               stop_grace_s: float = STOP_GRACE_SECONDS):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}.")
    self._source, self._prepare = source, prepare
    self._first_step, self._num_steps = first_step, num_steps
    self._pauses_after = pauses_after
    self._interrupted, self._stop_grace_s = interrupted, stop_grace_s
    self._reading = threading.Event()  # Set while the producer is inside a read.
    self._stopped_at: float | None = None
    self.consistent = True  # False once a stuck read was abandoned.
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._resume = threading.Event()
    self._stop = threading.Event()  # Read no further batch.
    self._closed = threading.Event()  # Abandon everything (the consumer is gone).
    self.exhausted = False
    self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
    self._thread.start()

  # Producer side.

  def _put(self, item: Any) -> bool:
    """Queues `item` (a batch already read must reach the consumer, even after
    stop()) unless closed first; returns whether it was queued."""
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        continue
    return False

  def _wait_for_resume(self) -> None:
    while not self._resume.wait(_POLL_SECONDS):
      if self._stop.is_set() or self._closed.is_set():
        return
    self._resume.clear()

  def _produce(self) -> None:
    step = self._first_step
    try:
      while step < self._num_steps and not self._stop.is_set():
        self._reading.set()
        try:
          local_batch = next(self._source)
        except StopIteration:
          self.exhausted = True
          break
        finally:
          self._reading.clear()
        arrays, num_tokens = self._prepare(local_batch)
        step += 1
        if not self._put(PreparedBatch(step, arrays, num_tokens)):
          return
        if self._pauses_after(step) and step < self._num_steps:
          self._wait_for_resume()
    except BaseException as error:  # pylint: disable=broad-except  (re-raised by __next__)
      self._put(_Failed(error))
      return
    self._put(_END)

  # Consumer side.

  def __iter__(self) -> "BatchPrefetcher":
    return self

  def __next__(self) -> PreparedBatch:
    while True:
      try:
        item = self._queue.get(timeout=_POLL_SECONDS)
      except queue.Empty:
        if self._closed.is_set() or (not self._thread.is_alive() and self._queue.empty()):
          raise StopIteration from None
        if not self._stop.is_set() and self._interrupted():
          self.stop()
        if (self._stop.is_set() and self._reading.is_set()
            and time.monotonic() - self._stopped_at > self._stop_grace_s):
          self.consistent = False  # Stuck inside a read: abandon it.
          raise StopIteration from None
        continue
      if item is _END:
        raise StopIteration
      if isinstance(item, _Failed):
        raise item.error
      return item

  def resume(self) -> None:
    """Lets the producer continue after a pausing step (its save is done)."""
    self._resume.set()

  def stop(self) -> None:
    """Reads no further batch; the queued ones are still returned."""
    if not self._stop.is_set():
      self._stopped_at = time.monotonic()
    self._stop.set()

  @property
  def stopping(self) -> bool:
    return self._stop.is_set()

  def close(self) -> None:
    self.stop()
    self._closed.set()
    # A producer stuck inside a read is a daemon thread: left behind, not waited for.
    self._thread.join(timeout=self._stop_grace_s if self.consistent else 1.0)

  def __enter__(self) -> "BatchPrefetcher":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
