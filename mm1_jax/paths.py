"""The one path abstraction for workdirs and output files: local or gs://.

Every file a program reads or writes in a workdir or output directory goes
through `as_path` (an etils.epath.Path, the abstraction Orbax itself uses):
local paths stay plain files, gs:// (and s3://) go through TensorFlow's
gfile or fsspec, so a TPU pod can write checkpoints, metrics, configs and
evaluation reports straight to a Cloud Storage bucket.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

# A workdir or output is remote when it is a URI (gs://bucket/run).
_URI_MARK = "://"


def is_remote(path: str | os.PathLike) -> bool:
  return _URI_MARK in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An epath.Path; local paths made absolute (Orbax's tensorstore refuses
  relative ones, and `make train` passes one)."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def write_json(path: str | os.PathLike, value: Any, **dump_kwargs) -> epath.Path:
  """Writes `value` as JSON to `path`, creating its directory; returns the path."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, **dump_kwargs))
  return path


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(as_path(path).read_text())


def append_lines(path: str | os.PathLike, lines: list[str]) -> None:
  """Appends lines to a text file (gfile re-uploads the object on gs://, so
  callers batch their lines: one append per log window, not per step)."""
  if not lines:
    return
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a") as f:
    f.write("".join(line + "\n" for line in lines))
