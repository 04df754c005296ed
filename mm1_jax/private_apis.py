"""The private JAX, Orbax and SeqIO APIs this project relies on, each behind one function.

Private modules change or vanish between releases without notice: keeping
every use here makes an upgrade's breakage one file to fix, and each function
falls back to a safe default when its module is missing. The imports are made
inside the functions so that importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any


def array_metadata_store() -> Any | None:
  """Orbax's per-array metadata store, for an ArrayHandler of our own.

  Private: Orbax exports ArrayHandler but not this store, which its own
  default handler registry builds in. It records the implementation of typed
  PRNG keys (the train state's 'rng'); without it they are written as their
  raw key data and restore as uint32 arrays. None (an Orbax without the
  module) gives ArrayHandler's default: no store.
  """
  try:
    from orbax.checkpoint._src.metadata import array_metadata_store as store_lib
  except ImportError:
    return None
  return store_lib.Store()


def num_tpu_chips() -> int:
  """TPU chips on this machine's PCI bus, counted without starting the TPU runtime.

  Private: it is what JAX's own TPU detection reads, and the public route
  (jax.devices()) would start the runtime, which jax.distributed.initialize
  must precede. 0 when the module is missing or cannot read the bus.
  """
  try:
    from jax._src import hardware_utils
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # pylint: disable=broad-except  (a JAX without it: assume none)
    return 0


def mixture_sample_fn(mixture: Any) -> Any:
  """How a seqio.Mixture samples its tasks: (datasets, rates, seed) -> dataset.

  Private: Mixture keeps its (configurable) sampling function in
  `_sample_fn`; the input pipeline mixes the per-task datasets itself (to tag
  each record with its task) and must sample exactly as Mixture.get_dataset.
  Fallback: SeqIO's default, tf.data's sample_from_datasets stopping when a
  task runs out.
  """
  sample = getattr(mixture, "_sample_fn", None)
  if sample is not None:
    return sample
  import functools

  import tensorflow as tf
  return functools.partial(tf.data.Dataset.sample_from_datasets, stop_on_empty_dataset=True)
