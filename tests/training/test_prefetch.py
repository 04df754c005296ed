"""The batch prefetcher: order, pauses at checkpoint steps, stop, errors."""

import itertools
import threading
import time

import pytest

from mm1_jax.training.prefetch import BatchPrefetcher


class CountingSource:
  """Yields 0, 1, 2, ...; `read` is how many items were taken (the position)."""

  def __init__(self, limit=None, fail_at=None):
    self.read, self.limit, self.fail_at = 0, limit, fail_at

  def __iter__(self):
    return self

  def __next__(self):
    if self.read == self.limit:
      raise StopIteration
    if self.read == self.fail_at:
      raise OSError(f"record {self.read} is unreadable")
    self.read += 1
    return self.read - 1


def prepare(item):
  return item * 10, 1


def test_batches_come_in_order_with_their_steps():
  source = CountingSource()
  with BatchPrefetcher(source, prepare, first_step=3, num_steps=8,
                       pauses_after=lambda step: False) as batches:
    got = [(b.step, b.arrays) for b in batches]
  assert got == [(4, 0), (5, 10), (6, 20), (7, 30), (8, 40)]
  assert source.read == 5


def test_the_position_at_a_pausing_step_is_exactly_the_batches_consumed():
  source = CountingSource()
  positions = {}
  with BatchPrefetcher(source, prepare, first_step=0, num_steps=9,
                       pauses_after=lambda step: step % 3 == 0, depth=4) as batches:
    for batch in batches:
      if batch.step % 3 == 0:
        time.sleep(0.1)  # The producer, were it not paused, would read ahead now.
        positions[batch.step] = source.read
        batches.resume()
  assert positions == {3: 3, 6: 6, 9: 9}


def test_stop_returns_what_was_read_and_reads_no_more():
  source = CountingSource()
  consumed = []
  with BatchPrefetcher(source, prepare, first_step=0, num_steps=100,
                       pauses_after=lambda step: False, depth=2) as batches:
    for batch in batches:
      consumed.append(batch.step)
      if batch.step == 2:
        time.sleep(0.1)  # Let the producer fill the queue.
        batches.stop()
  assert source.read == len(consumed) and 3 <= len(consumed) <= 5
  assert consumed == list(range(1, len(consumed) + 1))


def test_an_exhausted_source_ends_the_iteration():
  with BatchPrefetcher(CountingSource(limit=2), prepare, 0, 10, lambda s: False) as batches:
    assert [b.step for b in batches] == [1, 2]
  assert batches.exhausted


def test_errors_of_the_source_arrive_in_order():
  with BatchPrefetcher(CountingSource(fail_at=2), prepare, 0, 10, lambda s: False) as batches:
    assert [next(batches).step, next(batches).step] == [1, 2]
    with pytest.raises(OSError, match="record 2 is unreadable"):
      next(batches)


def test_closing_early_does_not_hang():
  before = threading.active_count()
  batches = BatchPrefetcher(itertools.count(), prepare, 0, 10**9, lambda s: s % 5 == 0)
  next(batches)
  batches.close()
  assert threading.active_count() == before
