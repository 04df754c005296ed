"""python -m mm1_jax.convert: per-component checkpoints of the packaged
DINOv2-S/14 (ONNX) and SmolLM2-135M (GGUF), and configs/mm1_smol.py built
to start from them."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import mm1_smol
from mm1_jax import config_lib, convert, testing
from mm1_jax.data import tasks
from mm1_jax.models.config import DecoderConfig, VitConfig
from mm1_jax.models.multimodal import MM1Model
from mm1_jax.training import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """{component: (checkpoint dir, config, a few converted leaves)}."""
  root = tmp_path_factory.mktemp("converted")
  result = {}
  for source, kwargs in (("dinov2_small", {}), ("smollm2", {"vocab_size": 49216})):
    component, config, params = convert.convert(source, **kwargs)
    sample = {"encoder": lambda p: {"pos_embed": p["pos_embed"].copy(),
                                    "ls1": p["blocks"]["ls1"].copy()},
              "llm": lambda p: {"embedding": p["embedder"]["embedding"].copy()}}[component](params)
    convert.write(str(root / component), component, config, params, source)
    result[component] = (str(root / component), config, sample)
  return result


def test_components_and_their_descriptions(converted):
  encoder_dir, encoder, _ = converted["encoder"]
  llm_dir, llm, sample = converted["llm"]
  assert (encoder.width, encoder.depth, encoder.patch_size, encoder.pos_grid_size) == (384, 12, 14, 37)
  assert (llm.width, llm.depth, llm.num_kv_heads, llm.vocab_size, llm.tie_embeddings) == (
      576, 30, 3, 49216, True)
  # The appended rows (image tokens) start at the mean of SmolLM2's embeddings.
  embedding = sample["embedding"]
  np.testing.assert_allclose(embedding[49152:], np.broadcast_to(
      embedding[:49152].mean(0), (64, 576)), rtol=1e-5, atol=1e-6)
  with open(os.path.join(llm_dir, convert.COMPONENT_FILE)) as f:
    description = json.load(f)
  assert description["component"] == "llm" and description["source"] == "smollm2"
  assert DecoderConfig(**{k: v for k, v in description["config"].items() if k != "moe"}).width == 576
  assert "--config.model.llm.num_kv_heads=3" in description["config_overrides"]


def test_mm1_smol_config_is_what_was_converted_and_loads_it(converted):
  """The towers of configs/mm1_smol.py are exactly the converted ones, and
  init_from's checkpoints fill them (the connector stays fresh)."""
  config = config_lib.mm1_config(mm1_smol.get_config("stage=1,cpu"))
  assert config.encoder == converted["encoder"][1]
  assert config.llm == converted["llm"][1]
  run = mm1_smol.get_config("stage=1")
  assert run.init_from == f"{mm1_smol.ENCODER_CHECKPOINT},{mm1_smol.LLM_CHECKPOINT}"

  batch = testing.random_multimodal_batch(config, batch_size=1, length=80)
  abstract = nn.unbox(jax.eval_shape(MM1Model(config).init, jax.random.key(0), batch["tokens"],
                                     batch["images"], batch["image_mask"]))["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  params, sources = checkpoint.load_component_params(
      [converted["encoder"][0], converted["llm"][0]], abstract, abstract)
  assert sources == {"encoder": converted["encoder"][0], "llm": converted["llm"][0]}
  assert isinstance(params["connector"], dict)  # Still the abstract (fresh) one.
  np.testing.assert_array_equal(np.asarray(params["llm"]["embedder"]["embedding"]),
                                converted["llm"][2]["embedding"])
  np.testing.assert_array_equal(np.asarray(params["encoder"]["blocks"]["ls1"]),
                                converted["encoder"][2]["ls1"])


def test_stages_train_what_llava_trains():
  one, two, three, four = (mm1_smol.get_config(f"stage={stage}") for stage in (1, 2, 3, 4))
  assert tuple(one.optimizer.freeze) == ("encoder", "llm") and one.model.freeze_llm
  # LLaVA's stage 1: caption pairs in its plain format.
  assert (one.data.mixture, one.data.chat_template) == ("llava_stage1", "plain")
  assert tuple(two.optimizer.freeze) == () and not two.model.freeze_llm
  assert two.init_from == "workdirs/mm1_smol_stage1" and two.data.mixture == "mm1_pretrain"
  assert tuple(three.optimizer.freeze) == ("encoder",) and three.data.mixture == "easy_vqa_sft"
  assert three.model.max_images >= tasks.VQA_DOCUMENT_QUESTIONS  # A whole few-shot document fits.
  assert mm1_smol.get_config("stage=3,from_workdir=w/s2").init_from == "w/s2"
  # LLaVA's stage 2: conversations in SmolLM2's own template, encoder frozen, from stage 1.
  assert (four.data.mixture, four.data.chat_template) == ("visual_sft", "")
  assert tuple(four.optimizer.freeze) == ("encoder",)
  assert four.init_from == "workdirs/mm1_smol_stage1" and four.eval.prompt_format == "chat"
  with pytest.raises(config_lib.ConfigError, match="image_tokens 64 or 144"):
    mm1_smol.get_config("image_tokens=100")


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "mm1_jax.convert", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_refuses_an_existing_output_and_unknown_sources(tmp_path):
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  result = run_cli("--source=dinov2_small", f"--output={tmp_path / 'taken'}")
  assert result.returncode == 1
  assert "exists; choose a new directory (nothing was overwritten)" in result.stderr
  assert os.listdir(tmp_path / "taken") == ["keep.txt"]
  result = run_cli(f"--source={tmp_path / 'weights.bin'}", f"--output={tmp_path / 'out'}")
  assert result.returncode == 1 and "no such file or directory" in result.stderr
  assert not (tmp_path / "out").exists()


def test_flags_of_the_other_component_are_refused():
  with pytest.raises(ValueError, match="--vocab_size applies to LLMs"):
    convert.convert("dinov2_small", vocab_size=50_000)
  with pytest.raises(ValueError, match=r"\['image_size'\] apply to image encoders"):
    convert.convert("smollm2", image_size=336)
  with pytest.raises(KeyError, match="unknown packaged weights"):
    from mm1_jax.conversion import packaged
    packaged.packaged_path("llama")


def test_vit_config_round_trips_through_the_description(converted):
  with open(os.path.join(converted["encoder"][0], convert.COMPONENT_FILE)) as f:
    values = json.load(f)["config"]
  values.update(image_mean=tuple(values["image_mean"]), image_std=tuple(values["image_std"]))
  assert VitConfig(**values) == converted["encoder"][1]
  assert dataclasses.asdict(converted["encoder"][1])["image_size"] == 224
