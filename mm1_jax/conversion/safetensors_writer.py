"""Writing Hugging Face safetensors checkpoints tensor by tensor, sharded, with an index.

    write_sharded(directory, lambda: export_decoder(params, config), dtype="bfloat16")

`tensors` is called twice: once to plan the files (names, shapes: views,
nothing is copied), once to write them. Each tensor is converted to the
stored dtype and streamed to its file on its own, so writing holds one
converted tensor at a time, never a second copy of the checkpoint. Files are
what save_pretrained writes: model.safetensors alone, or shards
model-0000i-of-0000n.safetensors of at most max_shard_bytes each (a larger
tensor gets a shard of its own) and model.safetensors.index.json
({"metadata": {"total_size"}, "weight_map": {name: file}}).

The safetensors format (github.com/huggingface/safetensors): an 8-byte
little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}} padded with spaces to
a multiple of 8 bytes, then the tensors' bytes, little-endian, row-major.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' save_pretrained default ("5GB").
DTYPES = {"float32": (np.dtype(np.float32), "F32"),
          "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16")}

TensorSource = Callable[[], Iterable[tuple[str, np.ndarray]]]


def _plan(tensors: TensorSource, itemsize: int, max_shard_bytes: float
          ) -> list[list[tuple[str, tuple[int, ...]]]]:
  """Names and shapes per shard, in the order `tensors` gives them."""
  shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
  size, seen = 0, set()
  for name, tensor in tensors():
    if name in seen:
      raise ValueError(f"tensor {name!r} is given twice.")
    seen.add(name)
    nbytes = int(np.prod(tensor.shape)) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, tuple(int(d) for d in tensor.shape)))
    size += nbytes
  return shards


def _header(entries: list[tuple[str, tuple[int, ...]]], dtype_name: str, itemsize: int,
            metadata: dict[str, str]) -> bytes:
  header, offset = {"__metadata__": metadata}, 0
  for name, shape in entries:
    nbytes = int(np.prod(shape)) * itemsize
    header[name] = {"dtype": dtype_name, "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  return struct.pack("<Q", len(encoded)) + encoded


def write_sharded(directory: str | os.PathLike, tensors: TensorSource, dtype: str = "float32",
                  max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
                  single_file: str = SINGLE_FILE) -> dict[str, str]:
  """Writes the tensors into `directory` (created; existing weight files of
  the same names are replaced). Returns {tensor name: file name}.

  tensors: called twice, yielding (name, array) in file order each time.
  dtype: "float32" | "bfloat16" (round to nearest even, as torch's .to()).
  max_shard_bytes: None = one file, single_file, whatever the size.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)}.")
  numpy_dtype, dtype_name = DTYPES[dtype]
  itemsize = numpy_dtype.itemsize
  shards = _plan(tensors, itemsize, max_shard_bytes or float("inf"))
  if not shards[0]:
    raise ValueError("no tensors to write.")
  names = ([single_file] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {name: file for file, entries in zip(names, shards) for name, _ in entries}
  os.makedirs(directory, exist_ok=True)
  stream = iter(tensors())
  total = 0
  for file, entries in zip(names, shards):
    with open(os.path.join(directory, file), "wb") as f:
      f.write(_header(entries, dtype_name, itemsize, {"format": "pt"}))
      for name, shape in entries:
        given, tensor = next(stream)
        if given != name or tuple(tensor.shape) != shape:
          raise ValueError(f"the tensors changed between the two passes: expected {name} "
                           f"{shape}, got {given} {tuple(tensor.shape)}.")
        data = np.ascontiguousarray(tensor, dtype=np.float32).astype(numpy_dtype, copy=False)
        f.write(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
        total += data.nbytes
  if len(shards) > 1:
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return weight_map
