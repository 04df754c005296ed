"""Prepares every bundled data source: `python -m mm1_jax.data.sources`.

`make test` runs this first, so parallel test workers never race to build
the same TFDS directory.
"""

from mm1_jax.data import sources

if __name__ == "__main__":
  for name in sorted(sources.BUILDER_MODULES):
    builder = sources.prepare(name)
    print(f"{name}: {builder.data_dir}")
