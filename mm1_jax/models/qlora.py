"""QLoRA: the frozen base of the LoRA-targeted linears stored as NF4.

With model.lora.quantize="nf4" every linear the LoRA targets select (except
lm_head, which stays in full precision with the embeddings and norms) holds
its base weight `{w}` ("kernel" of a DenseGeneral, "gate" / "up" / "down" of
MoE experts) as the arrays of an nf4.Nf4Tensor, bitsandbytes' layout:

    {w}_nf4_codes         uint8   [*lead, out, in / 2]
    {w}_nf4_absmax        uint8   [*lead, out, in / block_size]  (float32 without double quant)
    {w}_nf4_absmax_scale  float32 [*lead, ceil(out * in / block_size / 256)]  (double quant)
    {w}_nf4_offset        float32 [*lead]                                    (double quant)

in / out: the products of the kernel's input and output dims (a query kernel
[D, heads, head_dim] is the [D, heads * head_dim] weight HF's q_proj holds
transposed); lead: the scanned layer dim and, for experts, the expert dim.
The layer dequantises its weight in the compute dtype inside each product
(Nf4Kernel.matmul), rematerialised: the backward pass dequantises again
rather than keeping the float kernel, so only the running layer's weight is
ever in full precision, whatever the model's remat policy; the adapters stay
in param_dtype.

The codes are filled when weights are loaded: quantize_kernels turns the
float kernels of an init_from checkpoint (or of a whole model, for the
converter) into these arrays, tensor by tensor, bit-identical to
bitsandbytes.functional.quantize_4bit. A fresh init gives all-zero arrays
(a zero base): QLoRA always starts from pretrained weights.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mm1_jax.models import nf4
from mm1_jax.models.config import LoraConfig

NF4_FIELDS = ("codes", "absmax", "absmax_scale", "offset")
_MARK = "_nf4_"


def nf4_leaf(weight: str, field: str) -> str:
  """The params leaf holding `field` of the NF4 weight `weight`: kernel_nf4_codes."""
  return f"{weight}{_MARK}{field}"


def is_nf4(names: Sequence[str]) -> bool:
  """Whether the leaf at this path of key names is part of an NF4 weight."""
  leaf = str(names[-1]) if len(names) else ""
  return any(leaf.endswith(_MARK + field) for field in NF4_FIELDS)


def weight_name(leaf: str) -> str:
  """The weight an NF4 leaf belongs to: kernel_nf4_codes -> kernel."""
  return leaf.rsplit(_MARK, 1)[0]


def without_nf4(tree: Mapping[str, Any]) -> dict[str, Any]:
  """The nested dict without its NF4 leaves (empty dicts dropped)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      sub = without_nf4(value)
      if sub:
        out[key] = sub
    elif not is_nf4([key]):
      out[key] = value
  return out


def check_fan_in(fan_in: int, block_size: int, where: str) -> None:
  """NF4 blocks must run along whole rows of the torch-layout weight [out, in]
  (the layout that keeps the codes shardable like the kernel)."""
  if fan_in % block_size:
    raise ValueError(
        f"{where}: fan-in {fan_in} is not a multiple of the NF4 block size {block_size}; "
        "leave this linear out of model.lora.targets or pick a block_size that divides it.")


@struct.dataclass
class Nf4Kernel:
  """A layer's NF4 weight, as the layer uses it: matmul(x, kernel) products
  whose kernel [*lead, *in_dims, *out_dims] is dequantised in `dtype` inside
  the product. The product is rematerialised (jax.checkpoint saving nothing
  but its inputs), so the backward pass dequantises the codes again rather
  than keeping every layer's float kernel from the forward pass: the float
  kernel lives only while one layer runs, in training too."""
  tensor: nf4.Nf4Tensor
  kernel_shape: tuple[int, ...] = struct.field(pytree_node=False)
  dtype: Any = struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.kernel_shape

  def dequantize(self) -> jax.Array:
    return nf4.dequantize_nf4(self.tensor, self.dtype).reshape(self.kernel_shape)

  def matmul(self, product: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array
             ) -> jax.Array:
    """product(x, kernel) with the kernel dequantised inside (see the class doc)."""
    def dequantized_product(x, tensor):
      return product(x, self.replace(tensor=tensor).dequantize())
    return jax.checkpoint(dequantized_product, policy=jax.checkpoint_policies.nothing_saveable
                          )(x, self.tensor)


def nf4_kernel(module: nn.Module, weight: str, lead: tuple[int, ...], in_dims: tuple[int, ...],
               out_dims: tuple[int, ...], axes: tuple[str | None, ...], config: LoraConfig,
               dtype: Any, module_path: str) -> Nf4Kernel:
  """Declares the NF4 arrays of `weight` in `module`; returns them as an
  Nf4Kernel of shape [*lead, *in_dims, *out_dims] computing in `dtype`.

  axes: the float kernel's logical axes (lead + in + out); module_path: the
  linear's path as targets name it (for errors). The codes and
  absmax rows shard like the kernel's first output dim, the code columns
  like its first input dim (whole blocks), the small scales replicate.
  """
  num_lead, num_in = len(lead), len(in_dims)
  fan_in, fan_out = int(np.prod(in_dims)), int(np.prod(out_dims))
  check_fan_in(fan_in, config.block_size, module_path)
  lead_axes = tuple(axes[:num_lead])
  row_axis, column_axis = axes[num_lead + num_in], axes[num_lead]
  blocks = fan_out * fan_in // config.block_size
  shapes = {"codes": (lead + (fan_out, fan_in // 2), jnp.uint8, (row_axis, column_axis)),
            "absmax": (lead + (fan_out, fan_in // config.block_size),
                       jnp.uint8 if config.double_quant else jnp.float32, (row_axis, None))}
  if config.double_quant:
    shapes["absmax_scale"] = (lead + (-(-blocks // nf4.DOUBLE_QUANT_BLOCK_SIZE),), jnp.float32,
                              (None,))
    shapes["offset"] = (lead, jnp.float32, ())
  arrays = {field: module.param(nf4_leaf(weight, field), nn.with_logical_partitioning(
      nn.initializers.zeros, lead_axes + field_axes), shape, field_dtype)
            for field, (shape, field_dtype, field_axes) in shapes.items()}
  tensor = nf4.Nf4Tensor(arrays["codes"], arrays["absmax"], arrays.get("absmax_scale"),
                         arrays.get("offset"), shape=(fan_in, fan_out),
                         block_size=config.block_size)
  return Nf4Kernel(tensor, kernel_shape=lead + in_dims + out_dims, dtype=dtype)


def quantize_kernel(kernel: Any, codes_shape: Sequence[int], config: LoraConfig
                    ) -> dict[str, np.ndarray]:
  """{field: array} of one float kernel [*lead, *in_dims, *out_dims] (host
  numpy), for NF4 leaves whose codes have `codes_shape` [*lead, out, in / 2]."""
  kernel = np.asarray(kernel)
  lead = tuple(codes_shape[:-2])
  fan_out = int(codes_shape[-2])
  fan_in = int(np.prod(kernel.shape[len(lead):])) // fan_out
  if kernel.shape[:len(lead)] != lead or fan_in * fan_out != np.prod(kernel.shape[len(lead):]):
    raise ValueError(f"a kernel {kernel.shape} does not fit NF4 codes {tuple(codes_shape)}.")
  tensor = nf4.quantize_nf4(kernel.reshape(lead + (fan_in, fan_out)), config.block_size,
                            config.double_quant)
  arrays = {"codes": tensor.codes, "absmax": tensor.absmax, "absmax_scale": tensor.absmax_scale,
            "offset": tensor.offset}
  return {field: value for field, value in arrays.items() if value is not None}


def dequantize_weights(tree: Mapping[str, Any], block_size: int,
                       dtype: Any = jnp.float32) -> dict[str, Any]:
  """The tree with every NF4 weight dequantised back to a float kernel
  {w} [*lead, in, out] of `dtype`, flat over the in and out dims: callers
  that need the kernel's own dims reshape it (merge_lora does, from the
  adapters' shapes)."""
  out = {key: dequantize_weights(value, block_size, dtype) if isinstance(value, Mapping)
         else value for key, value in tree.items() if not is_nf4([key])}
  for key in tree:
    if is_nf4([key]) and key.endswith(_MARK + "codes"):
      weight = weight_name(key)
      codes = tree[key]
      fan_out, fan_in = codes.shape[-2], codes.shape[-1] * 2
      tensor = nf4.Nf4Tensor(codes, tree[nf4_leaf(weight, "absmax")],
                             tree.get(nf4_leaf(weight, "absmax_scale")),
                             tree.get(nf4_leaf(weight, "offset")), shape=(fan_in, fan_out),
                             block_size=block_size)
      out[weight] = nf4.dequantize_nf4(tensor, dtype)
  return out


def quantized_weights(abstract: Mapping[str, Any], prefix: tuple[str, ...] = ()
                      ) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  """(path of the float weight, codes shape) of every NF4 weight in a params
  tree (abstract or not): (("llm", "blocks", "layer_0", "attn", "query", "kernel"), ...)."""
  found = []
  for key, value in abstract.items():
    if isinstance(value, Mapping):
      found += quantized_weights(value, prefix + (key,))
    elif is_nf4([key]) and key.endswith(_MARK + "codes"):
      found.append((prefix + (weight_name(key),), tuple(value.shape)))
  return found


def quantize_into(params: dict[str, Any], abstract: Mapping[str, Any], config: LoraConfig,
                  read_kernel: Callable[[tuple[str, ...]], np.ndarray],
                  place: Callable[[np.ndarray, Any], Any]) -> dict[str, Any]:
  """Fills every NF4 weight of `params` (a nested dict like `abstract`, the
  quantised model's params; a float kernel in its place is dropped) from
  float kernels, one tensor at a time:
  read_kernel(path) gives the float kernel of the weight at `path` (host
  numpy; e.g. one leaf read from a checkpoint), place(array, abstract_leaf)
  puts an array where the abstract leaf says (device_put with its sharding).
  Peak host memory: one float kernel and its codes."""
  params = dict(params)
  for path, codes_shape in quantized_weights(abstract):
    kernel = read_kernel(path)
    try:
      arrays = quantize_kernel(kernel, codes_shape, config)
    except ValueError as error:
      raise ValueError(f"{'/'.join(path)}: {error} Check that the checkpoint was written for "
                       "this model config.") from None
    *module, weight = path
    target, shapes = params, abstract
    for key in module:  # Copies along the path: the caller's dicts stay as they were.
      target[key] = dict(target.get(key, {}))
      target, shapes = target[key], shapes[key]
    target.pop(weight, None)  # The float kernel, if `params` had it, is replaced.
    for field, array in arrays.items():
      target[nf4_leaf(weight, field)] = place(array, shapes[nf4_leaf(weight, field)])
  return params
