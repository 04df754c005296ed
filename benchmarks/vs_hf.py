"""mm1_jax against Hugging Face's PyTorch LLaVA, side by side, same weights.

    python benchmarks/vs_hf.py [--repeats=5] [--compile=true] [--torch_threads=0,1,2] \
      [--tasks=train,forward,generate] [--scan_unroll=1]

Builds one LLaVA-shaped model in transformers (LlavaForConditionalGeneration:
CLIP-style ViT 224 px / patch 16 / width 384 / 6 layers / 6 heads / MLP 1536 /
quick_gelu, last-layer patch features, 2-layer GELU projector, Llama decoder
width 512 / 8 layers / 8 heads / 4 kv heads / SwiGLU 1408 / vocab 32000,
untied: 67.8M parameters), saves it, imports it into mm1_jax through the LLaVA
converter (mm1_jax/conversion/hf_llava.py), and checks that both stacks give
the same step-0 loss on the same batch (4 rows x 512 tokens: 196 image
tokens + 316 text tokens each). Then it times, in interleaved rounds (one
repetition of every stack per round, so that the machine's load falls on all
alike), float32 throughout:

  train   one AdamW step (0.9, 0.95, eps 1e-8, wd 0.1; global-norm clip 1.0):
          ours is mm1_jax.training.train_step.TrainStep, the trainer's step;
          HF's is loss.backward(), clip_grad_norm_, optimizer.step()
  forward the logits of the batch (ours: MM1Model.apply under jit; HF: the
          model under torch.no_grad())
  generate greedy decoding of 4 prompts (196 image + 32 text tokens), exactly
          64 new tokens each (ours: evaluation.decoding.Generator with the KV
          cache; HF: model.generate with its cache, EOS disabled)

HF runs eagerly and, with --compile, also under torch.compile (train and
forward; generation stays eager). Printed per stack and task: min and
median seconds, tokens/s, "ours vs": their min over ours (above 1: we are
faster; our own row is 1), and the achieved
GFLOP/s of the train step and forward (model FLOPs from
mm1_jax.models.accounting, the same for both stacks) against each stack's
measured float32 1024^3 matmul peak; and the load average before and after.
Generation is timed at every --torch_threads setting for HF (0: torch's
default) and the best is compared.

Runs on CPU (where it was written to measure) or on any JAX backend beside
a CPU torch. Needs requirements-dev.txt (torch, transformers).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from mm1_jax import sharding  # noqa: E402
from mm1_jax.conversion import hf_llava  # noqa: E402
from mm1_jax.evaluation import decoding  # noqa: E402
from mm1_jax.models import accounting  # noqa: E402
from mm1_jax.models.multimodal import MM1Model  # noqa: E402
from mm1_jax.training import loss as loss_lib  # noqa: E402
from mm1_jax.training import metrics as metrics_lib  # noqa: E402
from mm1_jax.training.train_step import TrainStep, make_global_batch  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (each runs every stack once).")
_COMPILE = flags.DEFINE_bool("compile", True, "Also time HF under torch.compile.")
_TORCH_THREADS = flags.DEFINE_list("torch_threads", ["0"], "torch.set_num_threads settings "
                                   "to time HF generation at (0: torch's default).")
_TASKS = flags.DEFINE_list("tasks", ["train", "forward", "generate"], "What to time.")
_SCAN_UNROLL = flags.DEFINE_integer("scan_unroll", 1, "Our model.llm/encoder.scan_unroll "
                                    "(1: the layer stacks are loops, the default).",
                                    lower_bound=1)

BATCH, SEQ_LEN, IMAGE_TOKENS = 4, 512, 196
GEN_TEXT, GEN_NEW = 32, 64
IMAGE_TOKEN_ID = 31999
PAD_ID, EOS_ID = 0, 2


def hf_model():
  import torch
  import transformers
  vision = transformers.CLIPVisionConfig(
      image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=6,
      num_attention_heads=6, intermediate_size=1536, hidden_act="quick_gelu")
  text = transformers.LlamaConfig(
      hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
      intermediate_size=1408, vocab_size=32000, tie_word_embeddings=False,
      max_position_embeddings=1024, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=1)
  config = transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
      vision_feature_layer=-1, vision_feature_select_strategy="default",
      projector_hidden_act="gelu", image_seq_length=IMAGE_TOKENS)
  config._attn_implementation = "sdpa"
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(config).float()
  return model


def make_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Rows: BOS, 196 image tokens, text; labels -100 on the image tokens."""
  tokens = rng.integers(3, IMAGE_TOKEN_ID, (BATCH, SEQ_LEN)).astype(np.int32)
  tokens[:, 0] = 1
  tokens[:, 1:1 + IMAGE_TOKENS] = IMAGE_TOKEN_ID
  images = rng.integers(0, 256, (BATCH, 1, 224, 224, 3)).astype(np.uint8)
  return {"tokens": tokens, "images": images}


def our_train_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The train step's contract; position t predicts token t+1 where HF's
  shifted labels do (not an image token)."""
  tokens = batch["tokens"]
  targets = np.zeros_like(tokens)
  targets[:, :-1] = tokens[:, 1:]
  weights = np.zeros(tokens.shape, np.float32)
  weights[:, :-1] = tokens[:, 1:] != IMAGE_TOKEN_ID
  return {"decoder_input_tokens": tokens, "decoder_target_tokens": targets,
          "decoder_loss_weights": weights,
          "decoder_positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32),
                                               tokens.shape).copy(),
          "decoder_segment_ids": np.ones_like(tokens), "images": batch["images"],
          "image_mask": np.ones((BATCH, 1), bool)}


def pixel_values(images: np.ndarray, mean, std):
  """uint8 [B, H, W, 3] -> float32 NCHW normalised as our ViT does on device."""
  import torch
  x = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
      std, np.float32)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def hf_optimizer(model):
  import torch
  return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                           weight_decay=0.1)


def our_optimizer() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))


def torch_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
  import torch
  a = torch.ones(size, size)
  a @ a
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e12


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv):
  del argv
  import torch
  tasks = set(_TASKS.value)
  load_before = os.getloadavg()
  rng = np.random.default_rng(0)
  model = hf_model()
  with tempfile.TemporaryDirectory() as directory:
    model.save_pretrained(directory)
    parts, params = hf_llava.convert_llava_directory(directory)
  config = parts.mm1_config(dtype="float32", param_dtype="float32", max_images=1)
  config = dataclasses.replace(
      config, llm=dataclasses.replace(config.llm, scan_unroll=_SCAN_UNROLL.value),
      encoder=dataclasses.replace(config.encoder, scan_unroll=_SCAN_UNROLL.value))
  mean, std = config.encoder.image_mean, config.encoder.image_std
  num_params = sum(p.numel() for p in model.parameters())
  print(f"model: {num_params / 1e6:.1f}M parameters; batch {BATCH} x {SEQ_LEN} tokens "
        f"({IMAGE_TOKENS} image tokens per row), float32; JAX {jax.__version__} on "
        f"{jax.devices()[0].device_kind}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads", flush=True)

  batch = make_batch(rng)
  ours = our_train_batch(batch)
  input_ids = torch.from_numpy(batch["tokens"].astype(np.int64))
  pixels = pixel_values(batch["images"][:, 0], mean, std)
  labels = input_ids.clone()
  labels[labels == IMAGE_TOKEN_ID] = -100

  # ---- Our train step: the trainer's TrainStep, with the imported weights.
  mesh = sharding.make_mesh({"data": 1})
  optimizer = our_optimizer()
  step = TrainStep(config, optimizer, lambda _: 1e-4, mesh, BATCH, SEQ_LEN)
  device_params = jax.device_put(jax.tree.map(jnp.asarray, params),
                                 step.state_shardings["params"])
  state = {"step": jnp.zeros((), jnp.int32), "params": device_params,
           "opt_state": optimizer.init(device_params), "rng": jax.random.key(0)}
  device_batch = make_global_batch(ours, mesh)
  state, our_metrics = step.step(state, device_batch)
  our_loss = float(our_metrics["loss"])

  hf_opt = hf_optimizer(model)

  def hf_train(m, opt):
    opt.zero_grad(set_to_none=True)
    out = m(input_ids=input_ids, pixel_values=pixels, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    return out.loss

  hf_loss = float(hf_train(model, hf_opt))
  print(f"step-0 loss: mm1_jax {our_loss:.7f}, HF {hf_loss:.7f} "
        f"(difference {abs(our_loss - hf_loss):.2e})", flush=True)
  if not np.isclose(our_loss, hf_loss, rtol=1e-5, atol=1e-5):
    raise SystemExit(f"step-0 losses differ: {our_loss} vs {hf_loss}; the stacks do not "
                     "compute the same model, so timing them means nothing.")

  model_fn = MM1Model(config)
  forward = jax.jit(lambda p, t, i, m: model_fn.apply({"params": p}, t, i, m)[0])
  fwd_args = (state["params"], device_batch["decoder_input_tokens"], device_batch["images"],
              device_batch["image_mask"])
  forward(*fwd_args).block_until_ready()

  def hf_forward(m):
    with torch.no_grad():
      return m(input_ids=input_ids, pixel_values=pixels).logits

  # Compiled HF (same weights object: compile wraps the module).
  compiled = None
  if _COMPILE.value and tasks & {"train", "forward"}:
    try:
      compiled = torch.compile(model)
      compiled_opt = hf_optimizer(model)
      start = time.perf_counter()
      hf_train(compiled, compiled_opt)
      hf_forward(compiled)
      print(f"torch.compile warm-up: {time.perf_counter() - start:.0f} s", flush=True)
    except Exception as error:  # A stack that does not compile is reported, not fatal.
      print(f"torch.compile failed ({type(error).__name__}: {error}); HF compiled omitted.")
      compiled = None

  # Generation inputs: 4 prompts of BOS + 196 image tokens + 31 text tokens.
  gen_tokens = batch["tokens"][:, :1 + IMAGE_TOKENS + GEN_TEXT - 1].copy()
  prompts = decoding.make_prompts([list(row) for row in gen_tokens],
                                  [batch["images"][b] for b in range(BATCH)], config,
                                  pad_id=PAD_ID)
  # eos_id: a token id the random model does not pick first; EOS is disabled on
  # the HF side, and every row of ours must generate GEN_NEW tokens (checked).
  generator = decoding.Generator(config, decoding.DecodeConfig(
      max_new_tokens=GEN_NEW, method="greedy", eos_id=EOS_ID, pad_id=PAD_ID), mesh)
  gen_ids = torch.from_numpy(gen_tokens.astype(np.int64))

  def our_generate():
    out = generator(state["params"], prompts)
    if not np.all(out.lengths == GEN_NEW):
      raise SystemExit(f"our generation stopped early ({out.lengths}); pick another eos_id.")
    return out

  def hf_generate():
    with torch.no_grad():
      return model.generate(input_ids=gen_ids, pixel_values=pixels, max_new_tokens=GEN_NEW,
                            min_new_tokens=GEN_NEW, do_sample=False, eos_token_id=None,
                            pad_token_id=PAD_ID)

  if "generate" in tasks:
    our_generate()
    hf_generate()

  jax_peak = metrics_lib.measure_matmul_peak() * 1e3
  torch_peak = torch_matmul_peak() * 1e3
  default_threads = torch.get_num_threads()
  thread_settings = [int(t) or default_threads for t in _TORCH_THREADS.value]

  # ---- Interleaved rounds.
  times: dict[tuple[str, str], list[float]] = {}

  def record(task, stack, seconds):
    times.setdefault((task, stack), []).append(seconds)

  for _ in range(_REPEATS.value):
    if "train" in tasks:
      def ours_train():
        nonlocal state
        state, metrics = step.step(state, device_batch)
        jax.block_until_ready(metrics["loss"])
      record("train", "mm1_jax", timed(ours_train))
      record("train", "HF eager", timed(lambda: hf_train(model, hf_opt)))
      if compiled is not None:
        record("train", "HF compile", timed(lambda: hf_train(compiled, compiled_opt)))
    if "forward" in tasks:
      fwd_args = (state["params"],) + fwd_args[1:]
      record("forward", "mm1_jax", timed(lambda: forward(*fwd_args).block_until_ready()))
      record("forward", "HF eager", timed(lambda: hf_forward(model)))
      if compiled is not None:
        record("forward", "HF compile", timed(lambda: hf_forward(compiled)))
    if "generate" in tasks:
      record("generate", "mm1_jax", timed(our_generate))
      for threads in thread_settings:
        torch.set_num_threads(threads)
        record("generate", f"HF eager, {threads} threads", timed(hf_generate))
      torch.set_num_threads(default_threads)

  flops = {"train": accounting.flops_per_step(config, BATCH, SEQ_LEN)}
  flops["forward"] = flops["train"] / 3
  units = {"train": BATCH * SEQ_LEN, "forward": BATCH * SEQ_LEN, "generate": BATCH * GEN_NEW}
  print(f"\nmatmul peak (float32, 1024^3): JAX {jax_peak:.0f} GFLOP/s, torch "
        f"{torch_peak:.0f} GFLOP/s; {_REPEATS.value} interleaved rounds")
  print(f"{'task':9s} {'stack':24s} {'min s':>8s} {'median s':>9s} {'tokens/s':>9s} "
        f"{'ours vs':>9s} {'GFLOP/s':>8s} {'% peak':>7s}")
  for task in ("train", "forward", "generate"):
    rows = [(stack, ts) for (t, stack), ts in times.items() if t == task]
    if not rows:
      continue
    ours_min = min(times[(task, "mm1_jax")])
    for stack, ts in rows:
      best = min(ts)
      line = (f"{task:9s} {stack:24s} {best:8.3f} {float(np.median(ts)):9.3f} "
              f"{units[task] / best:9.0f} {best / ours_min:9.2f}x")
      if task in flops:
        achieved = flops[task] / best / 1e9
        peak = jax_peak if stack == "mm1_jax" else torch_peak
        line += f" {achieved:8.0f} {100 * achieved / peak:6.0f}%"
      print(line)
  print(f"\nload average before: {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}; after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  app.run(main)
