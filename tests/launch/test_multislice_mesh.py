"""A mesh spanning slices (config.mesh.dcn_data): fake TPU-like devices
that know their slice, devices grouped by process, and the 8 virtual CPU
devices of the test session cut into two "slices"."""

import dataclasses

import jax
import numpy as np
import pytest

from mm1_jax import config_lib, sharding
from mm1_jax.typed_config import ConfigError


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeSliceDevice(FakeDevice):
  slice_index: int = 0


def slice_of(device_array, devices_per_slice):
  return np.vectorize(lambda d: d.id // devices_per_slice)(device_array)


def test_devices_with_a_slice_index_use_jax_hybrid_mesh():
  # 2 slices x 4 devices, listed interleaved: placement must follow slice_index.
  devices = [FakeSliceDevice(id=i, process_index=i // 2, slice_index=i // 4)
             for i in (0, 4, 1, 5, 2, 6, 3, 7)]
  array = sharding.hybrid_device_array((2, 1, 2, 1), (2, 1, 1, 1), devices)
  assert array.shape == (4, 1, 2, 1)
  # The data axis: its first 2 rows in slice 0, the last 2 in slice 1; the
  # tensor axis never leaves a slice.
  np.testing.assert_array_equal(slice_of(array, 4)[:, 0, :, 0], [[0, 0], [0, 0], [1, 1], [1, 1]])


def test_devices_without_a_slice_index_are_grouped_by_process():
  # 2 processes (nodes) x 4 devices, listed out of order.
  devices = [FakeDevice(id=i, process_index=i // 4) for i in (7, 0, 6, 1, 5, 2, 4, 3)]
  array = sharding.hybrid_device_array((1, 4, 1, 1), (2, 1, 1, 1), devices)
  assert array.shape == (2, 4, 1, 1)
  np.testing.assert_array_equal(np.vectorize(lambda d: d.process_index)(array)[:, :, 0, 0],
                                [[0] * 4, [1] * 4])


def test_make_mesh_over_two_slices_of_virtual_devices():
  mesh = sharding.make_mesh(dict(data=-1, tensor=2, dcn_data=2))
  assert dict(mesh.shape) == dict(data=4, fsdp=1, tensor=2, expert=1)
  ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, 0, :, 0]
  assert set(ids[:2].ravel()) == {0, 1, 2, 3} and set(ids[2:].ravel()) == {4, 5, 6, 7}


def test_the_default_config_mesh_is_one_slice():
  config = config_lib.base_config()
  assert config.mesh.dcn_data == 1
  mesh = sharding.make_mesh(dict(config.mesh))
  assert dict(mesh.shape) == dict(data=jax.device_count(), fsdp=1, tensor=1, expert=1)


@pytest.mark.parametrize("sizes, message", [
    (dict(data=-1, dcn_data=3), r"8 devices do not split into the 3 slices"),
    (dict(data=-1, dcn_data=-1), r"slice counts must be positive"),
    (dict(data=-1, dcn_pipeline=2), r"unknown axis \['dcn_pipeline'\]"),
])
def test_bad_slice_counts_are_named(sizes, message):
  with pytest.raises(ConfigError, match=message):
    sharding.make_mesh(sizes)


def test_more_slices_asked_for_than_tpu_slices_exist():
  devices = [FakeSliceDevice(id=i, process_index=0, slice_index=0, platform="tpu",
                             device_kind="TPU v4") for i in range(8)]
  with pytest.raises(ConfigError, match=r"Number of slices 1 must equal"):
    sharding.hybrid_device_array((4, 1, 1, 1), (2, 1, 1, 1), devices)
