"""NF4 4-bit weights with double quantisation, bit-identical to bitsandbytes.

QLoRA keeps the frozen base weights as 4-bit NormalFloat codes
(bitsandbytes.functional.quantize_4bit(W, quant_type="nf4", blocksize=64,
compress_statistics=True)). This module reproduces that format exactly:

Quantisation (host side, numpy: it runs once per weight at conversion, and
exact float32 arithmetic in a fixed order is what makes it bit-identical):
  1. A JAX kernel [in, out] is transposed to torch's [out, in] and read
     row-major, in blocks of `block_size` (64) values.
  2. Per block absmax; x * (1 / absmax) (x / absmax for a trailing partial
     block, as bitsandbytes does) clamped to [-1, 1] and mapped to the
     nearest of the 16 NF4_CODE values, ties to the lower index.
  3. Two codes per byte, the first in the high nibble; an odd count is padded
     with code 7 (0.0).
  4. Double quantisation: offset = mean(absmax), summed in the order of
     torch's single-threaded CPU sum (_torch_float32_sum; torch may split the
     sum of a very large weight's absmax across threads, which moves its
     last bit); absmax - offset is quantised to 8 bits with the signed
     dynamic map (DYNAMIC_MAP) in blocks of 256, each with its own float32
     scale (the absmax of those 256 values).

Dequantisation (dequantize_nf4, jit-able JAX): absmax = DYNAMIC_MAP[q] *
scale + offset, then NF4_CODE[nibble] * absmax, all in float32, cast to the
compute dtype at the end. Bytes per parameter: 0.5 (codes) + 1/64 (8-bit
absmax) + 4/(64*256) (scales), ~0.516, i.e. ~0.258x bfloat16 (nf4_bytes).

Layout of an Nf4Tensor for one weight [in, out] (n = in * out). Blocks never
straddle torch rows when in % block_size == 0 (every real LLM kernel), so
codes and absmax keep a row dim that shards like the kernel's `out` dim and a
column dim that shards like its `in` dim (in whole blocks); the small
absmax_scale and offset are meant to be replicated:
  rows, row_len = out, in          if in % block_size == 0
  rows, row_len = 1, n             otherwise (bitsandbytes' flat blocking:
                                   blocks cross rows, the last one is partial)
  codes         uint8   [rows, ceil(row_len / 2)]
  absmax        uint8   [rows, ceil(row_len / block_size)]  (float32 without
                                                            double quant)
  absmax_scale  float32 [ceil(rows * ceil(row_len / block_size) / 256)]
  offset        float32 []
Stacked weights [*lead, in, out] (a scanned layer stack) give every array the
same leading dims [*lead, ...]: each weight is quantised on its own, and
dequantize_nf4 maps over any leading dims (and vmaps / scans).

bitsandbytes' 8-bit blockwise quantisation of the absmax differs between its
backends. absmax_rounding="nearest" reproduces its pure-PyTorch backend (the
nearest code, ties to the lower index; its CUDA kernel's binary search also
ends at the nearest code, ties aside); "cpu_lut" reproduces its native CPU
kernel (libbitsandbytes_cpu, 0.50), which rounds through a 65536-entry lookup
table and so picks a neighbouring code for ~0.2% of the absmax values (it
never yields the code 0.0). Both dequantise with the same formula.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mm1_jax.models.config import NF4_BLOCK_SIZES

# The 16 NF4 values (bitsandbytes get_4bit_type("nf4"); QLoRA, Dettmers et al.
# 2023): quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0 at index 7.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

# Block sizes quantize_4bit accepts.
BLOCK_SIZES = NF4_BLOCK_SIZES
# quantize_4bit's double quantisation always uses blocks of 256 absmax values.
DOUBLE_QUANT_BLOCK_SIZE = 256
ABSMAX_ROUNDINGS = ("nearest", "cpu_lut")
# torch's absmax.clamp(min=1e-38) before the reciprocal; 1e-38 rounds to a
# float32 subnormal, as torch's scalar conversion does.
_TINY = np.float32(1e-38)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> np.ndarray:
  """bitsandbytes' dynamic map: float32 [256] (zero-padded below 8 bits), sorted.

  Dettmers' dynamic data type: for exponent e = 0..max_exponent_bits-1 the
  decade [10**(e-6) * 0.1, 10**(e-6)] holds 2**e (signed) linear-bin means,
  mirrored for negative values; 0 and 1.0 complete the 256 values. Signed:
  127 negative values down to -0.99297, 0 at index 127, 128 positive ones
  up to 1.0. Every float32 rounding step of bitsandbytes'
  create_dynamic_map is reproduced, so the map is bit-identical.
  """
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  values = []

  def decade(exponent: int, num_means: int) -> None:
    boundaries = _torch_linspace_float32(0.1, 1.0, num_means + 1)
    means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
    # torch multiplies a float32 tensor by a Python float in float32.
    scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + exponent))
    values.append(scale * means)
    if signed:
      values.append(-scale * means)

  for i in range(max_exponent_bits):
    shift = i + non_sign_bits - max_exponent_bits
    decade(i, 2 ** shift if signed else 2 ** (shift + 1))
  if additional_items > 0:
    decade(max_exponent_bits - 1, additional_items)
  values.append(np.array([0.0, 1.0], np.float32))
  data = np.concatenate(values).astype(np.float32)
  if data.size != 2 ** total_bits:
    raise ValueError(f"the dynamic map has {data.size} values, not {2 ** total_bits}; "
                     "check max_exponent_bits / total_bits.")
  # Maps of fewer than 8 bits still fill 256 entries, the rest zeros.
  data = np.concatenate([data, np.zeros(256 - data.size, np.float32)])
  return np.sort(data)


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace(start, end, steps, dtype=float32) on CPU, bit for bit.

  torch computes a float32 step, then start + step * i for the first half and
  end - step * (steps - 1 - i) for the second, each as one fused multiply-add
  (a single rounding; float64 holds the exact product and sum here).
  """
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float32((end32 - start32) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  first = np.float64(start32) + np.float64(step) * i
  second = np.float64(end32) - np.float64(step) * (steps - 1 - i)
  return np.where(i < steps // 2, first, second).astype(np.float32)


# bitsandbytes' default code for the 8-bit absmax (create_dynamic_map(signed=True)).
DYNAMIC_MAP = create_dynamic_map(signed=True)


@struct.dataclass
class Nf4Tensor:
  """One NF4 weight [in, out], or a stack [*lead, in, out] (module docstring).

  codes:        uint8 [*lead, rows, ceil(row_len / 2)], two codes per byte.
  absmax:       uint8 [*lead, rows, row_blocks] DYNAMIC_MAP indices of the
                centred absmax (double quant), else float32 absmax.
  absmax_scale: float32 [*lead, ceil(rows * row_blocks / 256)] or None.
  offset:       float32 [*lead] or None.
  shape:        (in, out) of one weight (static).
  block_size:   values per absmax (static).
  """
  codes: Any
  absmax: Any
  absmax_scale: Any
  offset: Any
  shape: tuple[int, int] = struct.field(pytree_node=False)
  block_size: int = struct.field(pytree_node=False, default=64)

  @property
  def double_quant(self) -> bool:
    return self.absmax_scale is not None

  @property
  def nbytes(self) -> int:
    """Bytes of all arrays (codes + absmax + scales + offsets)."""
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(self))


def nf4_layout(shape: tuple[int, int], block_size: int = 64) -> tuple[int, int]:
  """(rows, row_len) of the codes for a weight [in, out] (module docstring)."""
  fan_in, fan_out = shape
  if fan_in % block_size == 0:
    return fan_out, fan_in
  return 1, fan_in * fan_out


def nf4_bytes(num_params: int, block_size: int = 64, double_quant: bool = True) -> int:
  """Bytes of one NF4 weight of `num_params` values (codes + scales).

  ceil(n / 2) code bytes + one absmax per block (uint8 with double quant,
  else float32) + with double quant a float32 scale per 256 absmax and the
  float32 offset. Assumes the flat block count ceil(n / block_size), which is
  the count of either layout whenever in % block_size == 0.
  """
  blocks = -(-num_params // block_size)
  total = -(-num_params // 2)
  if double_quant:
    total += blocks + 4 * -(-blocks // DOUBLE_QUANT_BLOCK_SIZE) + 4
  else:
    total += 4 * blocks
  return total


# ----------------------------------------------------------------- quantise


def quantize_nf4(weight: Any, block_size: int = 64, double_quant: bool = True,
                 absmax_rounding: str = "nearest") -> Nf4Tensor:
  """Quantises a kernel [*lead, in, out] to NF4 (host side; numpy arrays).

  Equals bitsandbytes.functional.quantize_4bit(W.T, quant_type="nf4",
  blocksize=block_size, compress_statistics=double_quant) for each weight W
  [in, out], bit for bit: codes, absmax (8-bit codes or float32), the absmax
  blocks' scales and the offset. absmax_rounding picks the backend whose
  8-bit absmax rounding is reproduced ("nearest": its PyTorch and CUDA
  backends; "cpu_lut": its native CPU kernel; module docstring).
  Shapes where in % block_size != 0 use bitsandbytes' flat blocking (rows=1),
  its last block partial when n % block_size != 0. The result holds numpy
  arrays: jax.device_put it, with a sharding, to place it.
  """
  if block_size not in BLOCK_SIZES:
    raise ValueError(f"block_size {block_size} is not one bitsandbytes supports: {BLOCK_SIZES}.")
  if absmax_rounding not in ABSMAX_ROUNDINGS:
    raise ValueError(f"absmax_rounding {absmax_rounding!r} is not one of {ABSMAX_ROUNDINGS}.")
  w = np.asarray(weight)
  if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):  # bfloat16 included
    raise ValueError(f"quantize_nf4 needs a float kernel [*lead, in, out], got {w.dtype} "
                     f"{w.shape}; reshape multi-dim kernels to [in, out] first.")
  lead, shape = w.shape[:-2], (int(w.shape[-2]), int(w.shape[-1]))
  rows, row_len = nf4_layout(shape, block_size)
  # torch layout [out, in], read row-major: the transpose is what makes the
  # blocks run along `in`, as in bitsandbytes' Linear4bit weights.
  x = np.swapaxes(w.astype(np.float32), -1, -2).reshape(lead + (rows, row_len))
  codes, absmax = _quantize_4bit_rows(x, block_size)
  if not double_quant:
    return Nf4Tensor(codes, absmax, None, None, shape=shape, block_size=block_size)
  flat_absmax = absmax.reshape(lead + (-1,))
  offset = np.asarray(_torch_float32_mean(flat_absmax), np.float32)  # [*lead]
  centred = (flat_absmax - offset[..., None]).astype(np.float32)
  quantise_8bit = (_quantize_8bit_nearest if absmax_rounding == "nearest"
                   else _quantize_8bit_cpu_lut)
  absmax_codes, absmax_scale = quantise_8bit(centred, DOUBLE_QUANT_BLOCK_SIZE)
  return Nf4Tensor(codes, absmax_codes.reshape(absmax.shape), absmax_scale, offset,
                   shape=shape, block_size=block_size)


def _torch_blockwise_scale(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """bitsandbytes' PyTorch-backend block scaling of x [..., L] along its last dim.

  Returns (x / absmax clamped to [-1, 1] [..., L], absmax [..., ceil(L / bs)]).
  Full blocks multiply by the reciprocal of max(absmax, 1e-38) and keep the
  unclamped absmax; a trailing partial block divides by its clamped absmax
  and stores that (bitsandbytes' two code paths differ in exactly this way).
  """
  length = x.shape[-1]
  full = length // block_size
  head = x[..., :full * block_size].reshape(x.shape[:-1] + (full, block_size))
  absmax = np.abs(head).max(axis=-1)
  reciprocal = np.float32(1.0) / np.maximum(absmax, _TINY)
  scaled = np.clip(head * reciprocal[..., None], -1.0, 1.0).reshape(x.shape[:-1] + (-1,))
  if length % block_size:
    tail = x[..., full * block_size:]
    tail_absmax = np.maximum(np.abs(tail).max(axis=-1), _TINY)
    scaled = np.concatenate([scaled, np.clip(tail / tail_absmax[..., None], -1.0, 1.0)], -1)
    absmax = np.concatenate([absmax, tail_absmax[..., None]], -1)
  return scaled.astype(np.float32), absmax.astype(np.float32)


def _midpoints(code: np.ndarray) -> np.ndarray:
  """Decision bounds between neighbouring sorted code values, in float32."""
  return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


_NF4_BOUNDS = _midpoints(NF4_CODE)
_DYNAMIC_BOUNDS = _midpoints(DYNAMIC_MAP)


def _nearest_code(scaled: np.ndarray, bounds: np.ndarray) -> np.ndarray:
  """Index of the nearest code, ties to the lower index (torch.bucketize)."""
  return np.searchsorted(bounds, scaled, side="left").astype(np.uint8)


def _quantize_4bit_rows(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """x float32 [..., rows, L] -> (codes uint8 [..., rows, ceil(L/2)], absmax [..., rows, nb])."""
  scaled, absmax = _torch_blockwise_scale(x, block_size)
  if scaled.shape[-1] % 2:
    # bitsandbytes pads the scaled values with 0.0, which becomes code 7.
    scaled = np.concatenate([scaled, np.zeros(scaled.shape[:-1] + (1,), np.float32)], -1)
  nibbles = _nearest_code(scaled, _NF4_BOUNDS)
  return (nibbles[..., 0::2] << 4) | nibbles[..., 1::2], absmax


def _quantize_8bit_nearest(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """bitsandbytes' PyTorch quantize_blockwise: x [..., m] -> (uint8 [..., m], absmax [..., nb])."""
  scaled, absmax = _torch_blockwise_scale(x, block_size)
  return _nearest_code(scaled, _DYNAMIC_BOUNDS), absmax


_LUT_SIZE = 65536


@functools.cache
def _cpu_lut() -> np.ndarray:
  """libbitsandbytes_cpu's table: uint16 grid index -> DYNAMIC_MAP index, uint8 [65536].

  Grid point i is -1 + 2i / 65535 (float32); its entry is the count of code
  midpoints below it, i.e. the nearest code with ties to the lower index.
  """
  midpoints = (np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])).astype(np.float32)
  grid = np.arange(_LUT_SIZE).astype(np.float32)
  grid = np.float32(-1.0) + (np.float32(2.0) * grid) / np.float32(_LUT_SIZE - 1)
  return np.searchsorted(midpoints, grid, side="left").astype(np.uint8)


def _quantize_8bit_cpu_lut(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """libbitsandbytes_cpu's quantize_blockwise: x [..., m] -> (uint8 [..., m], absmax [..., nb]).

  Every block (the last one too) multiplies by 1 / absmax and keeps the
  unclamped absmax; an all-zero block gets code 0. The scaled value t goes
  to grid index trunc((t + 1) * 0.5 * 65535 + 0.5), whose last multiply-add
  the compiled kernel fuses (one rounding: float64 holds it exactly).
  """
  length = x.shape[-1]
  num_blocks = -(-length // block_size)
  # Zero padding leaves each block's absmax unchanged; the padded codes are cut.
  padded = np.concatenate(
      [x, np.zeros(x.shape[:-1] + (num_blocks * block_size - length,), np.float32)], -1)
  blocks = padded.reshape(x.shape[:-1] + (num_blocks, block_size))
  absmax = np.abs(blocks).max(axis=-1)
  zero = absmax == 0
  reciprocal = np.float32(1.0) / np.where(zero, np.float32(1.0), absmax)
  scaled = np.clip(blocks * reciprocal[..., None], -1.0, 1.0).astype(np.float32)
  half = ((scaled + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
  grid_index = (half.astype(np.float64) * (_LUT_SIZE - 1) + 0.5).astype(np.float32)
  codes = _cpu_lut()[grid_index.astype(np.uint16)]
  codes = np.where(zero[..., None], np.uint8(0), codes)
  return codes.reshape(x.shape[:-1] + (-1,))[..., :length], absmax.astype(np.float32)


# torch's float32 sum on CPU (aten SumKernel cascade_sum, single-threaded):
# 8-float vectors (the kernel torch runs on x86, AVX-512 CPUs included), 4 of
# them accumulated side by side, in a 4-level cascade of chunks.
_SUM_LANES = 8
_SUM_ILP = 4
_SUM_LEVELS = 4


def _sequential_sum(x: np.ndarray, axis: int) -> np.ndarray:
  """Left-to-right float32 sum along `axis`; 0 for an empty axis."""
  if x.shape[axis] == 0:
    return np.zeros(np.delete(np.array(x.shape), axis % x.ndim), np.float32)
  return np.add.accumulate(x, axis=axis, dtype=np.float32).take(-1, axis=axis)


def _ceil_log2(x: int) -> int:
  """c10's utils::CeilLog2 (1 for x <= 2)."""
  return 1 if x <= 2 else int(x - 1).bit_length()


def _cascade_sum(rows: np.ndarray) -> np.ndarray:
  """torch's multi_row_sum: rows [..., size, lanes] -> [..., lanes].

  Level 0 adds `step` rows, level 1 adds `step` level-0 sums, level 2 adds
  `step` level-1 sums, level 3 adds all level-2 sums; the partial chunks
  left at each level are then added, lowest level first.
  """
  step = 1 << max(4, _ceil_log2(rows.shape[-2]) // _SUM_LEVELS)
  level, leftovers = rows, []
  for _ in range(_SUM_LEVELS - 1):
    complete = level.shape[-2] // step
    leftovers.append(_sequential_sum(level[..., complete * step:, :], -2))
    head = level[..., :complete * step, :]
    level = _sequential_sum(head.reshape(head.shape[:-2] + (complete, step, head.shape[-1])), -2)
  total = leftovers[0]
  for partial in leftovers[1:] + [_sequential_sum(level, -2)]:
    total = (total + partial).astype(np.float32)
  return total


def _row_sum(vectors: np.ndarray) -> np.ndarray:
  """torch's row_sum: vectors [..., size, lanes] -> [..., lanes]."""
  size, lanes = vectors.shape[-2:]
  size_ilp = size // _SUM_ILP
  interleaved = vectors[..., :size_ilp * _SUM_ILP, :].reshape(
      vectors.shape[:-2] + (size_ilp, _SUM_ILP * lanes))
  partial = _cascade_sum(interleaved).reshape(vectors.shape[:-2] + (_SUM_ILP, lanes))
  total = partial[..., 0, :]
  for i in range(size_ilp * _SUM_ILP, size):
    total = (total + vectors[..., i, :]).astype(np.float32)
  for k in range(1, _SUM_ILP):
    total = (total + partial[..., k, :]).astype(np.float32)
  return total


def _torch_float32_sum(x: np.ndarray) -> np.ndarray:
  """torch.sum(x, -1) of float32 x [..., n] on CPU, bit for bit -> [...].

  float32 sums depend on the order of the additions; bitsandbytes' offset is
  torch's, so its order is reproduced (aten/src/ATen/native/cpu/SumKernel.cpp,
  single thread; torch splits sums over 32768+ values across threads, which
  changes the last bits with the thread count).
  """
  n = x.shape[-1]
  if n < _SUM_LANES:
    return _row_sum(x[..., None])[..., 0]
  vec_size = n // _SUM_LANES
  vectors = x[..., :vec_size * _SUM_LANES].reshape(x.shape[:-1] + (vec_size, _SUM_LANES))
  lanes = _row_sum(vectors)
  total = np.zeros(x.shape[:-1], np.float32)
  for i in range(vec_size * _SUM_LANES, n):
    total = (total + x[..., i]).astype(np.float32)
  for k in range(_SUM_LANES):
    total = (total + lanes[..., k]).astype(np.float32)
  return total


def _torch_float32_mean(x: np.ndarray) -> np.ndarray:
  """torch's x.mean(-1) for float32 on CPU: its sum, then divided by n in float32."""
  return (_torch_float32_sum(x) / np.float32(x.shape[-1])).astype(np.float32)


# --------------------------------------------------------------- dequantise


def dequantize_absmax(q: Nf4Tensor) -> jax.Array:
  """The float32 absmax of every block: [*lead, rows, row_blocks] (jit-able).

  Double quant: DYNAMIC_MAP[code] * scale of its 256-block + offset, with the
  product rounded to float32 before the add, as bitsandbytes' two separate
  ops do. Under jit XLA fuses a multiply feeding an add into one fused
  multiply-add (a single rounding; optimization_barrier does not stop it), so
  the product goes through max(product, -scale) first: an exact identity,
  since every code is > -1, that XLA and LLVM cannot see through.
  """
  if not q.double_quant:
    return jnp.asarray(q.absmax, jnp.float32)
  codes = jnp.asarray(q.absmax)
  lead, count = codes.shape[:-2], codes.shape[-2] * codes.shape[-1]
  num_scales = q.absmax_scale.shape[-1]
  values = jnp.asarray(DYNAMIC_MAP)[codes.reshape(lead + (count,))]
  padding = num_scales * DOUBLE_QUANT_BLOCK_SIZE - count  # a partial last 256-block
  values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, padding)])
  values = values.reshape(lead + (num_scales, DOUBLE_QUANT_BLOCK_SIZE))
  scale = jnp.asarray(q.absmax_scale, jnp.float32)[..., None]
  values = jnp.maximum(values * scale, -scale).reshape(lead + (-1,))[..., :count]
  absmax = values + jnp.asarray(q.offset, jnp.float32)[..., None]
  return absmax.reshape(codes.shape)


def dequantize_nf4(q: Nf4Tensor, dtype: Any = jnp.bfloat16) -> jax.Array:
  """The kernel [*lead, in, out] in `dtype` (jit-able, vmaps over lead dims).

  NF4_CODE[nibble] * absmax in float32 (bitsandbytes' dequantize_4bit), cast
  to `dtype` once at the end, then transposed back from torch's [out, in].
  """
  rows, row_len = nf4_layout(q.shape, q.block_size)
  absmax = dequantize_absmax(q)
  codes = jnp.asarray(q.codes)
  lead, num_blocks = codes.shape[:-2], absmax.shape[-1]
  nibbles = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(lead + (rows, -1))
  values = jnp.asarray(NF4_CODE)[nibbles[..., :row_len]]
  padding = num_blocks * q.block_size - row_len  # a partial last block (flat layout only)
  values = jnp.pad(values, [(0, 0)] * (len(lead) + 1) + [(0, padding)])
  values = values.reshape(lead + (rows, num_blocks, q.block_size)) * absmax[..., None]
  values = values.reshape(lead + (rows, -1))[..., :row_len]
  fan_in, fan_out = q.shape
  torch_layout = values.reshape(lead + (fan_out, fan_in)).astype(dtype)
  return jnp.swapaxes(torch_layout, -1, -2)
