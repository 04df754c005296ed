"""The private JAX and Orbax APIs still exist where mm1_jax/private_apis.py looks."""

from mm1_jax import private_apis


def test_orbax_array_metadata_store_is_found():
  # None would mean the fallback: typed PRNG keys would restore as raw key data.
  assert private_apis.array_metadata_store() is not None


def test_tpu_chip_count_on_a_machine_without_tpus():
  # Tests run without TPUs (tests/launch/test_train_cluster_env.py assumes it too).
  assert private_apis.num_tpu_chips() == 0
