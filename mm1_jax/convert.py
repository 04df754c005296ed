"""Convert pretrained weights into mm1_jax parameter checkpoints, one component each
(or, for a LLaVA, the whole model).

    python -m mm1_jax.convert --source=smollm2 --output=checkpoints/smollm2_135m \
        [--vocab_size=49216]
    python -m mm1_jax.convert --source=dinov2_small --output=checkpoints/dinov2_s14 \
        [--image_size=224 --feature_layer=-1]
    python -m mm1_jax.convert --source=/path/to/hf_model_dir --output=...

--source is a Hugging Face directory (config.json + *.safetensors: Llama,
Mistral, Qwen2, Mixtral, CLIP, SigLIP, DINOv2, LLaVA), a .gguf file (Llama-family
LLMs), a .onnx file (a DINOv2 backbone), or a packaged alias (smollm2,
dinov2_small; see mm1_jax/conversion/packaged.py). The output is an Orbax
params checkpoint holding {"llm": ...} or {"encoder": ...}; start training
from it with

    --config.init_from=checkpoints/dinov2_s14,checkpoints/smollm2_135m

(components not in any listed checkpoint, e.g. the connector, keep their
fresh initialisation). The converted component's architecture is written to
{output}/mm1_component.json, with the config overrides that select it.
--output may be a gs:// directory; --source must be on this machine.

LLaVA: a LlavaForConditionalGeneration directory (CLIP / SigLIP tower, MLP
projector, Llama-family LLM; conversion/hf_llava.py) converts whole, as
component "mm1": the checkpoint holds {"encoder", "connector", "llm"} (the
projector as the "mlp" connector), and mm1_component.json's overrides set
model.encoder (feature_layer from vision_feature_layer), model.connector
(kind mlp, one token per patch), model.llm and model.image_placeholder_id
(the image token). Train from it with --config.init_from=DIR plus those
overrides; --vocab_size and --image_size apply to its LLM and encoder.

LoRA: a run trained with model.lora adapters is merged into a plain params
checkpoint (every adapted kernel W + scale * A B, in float32; no adapters):

    python -m mm1_jax.convert --lora_merge --source=workdirs/run_lora \
        --output=checkpoints/run_merged

--source is the run's workdir (its newest checkpoint) or one step directory
({workdir}/checkpoints/{step}); the run's {workdir}/config.json gives the
model and its LoRA settings. The output holds the whole params tree
(encoder, connector, llm); start from it with model.lora.rank=0 and
--config.init_from=checkpoints/run_merged. A description of the merge is
written to {output}/mm1_lora_merge.json.

Hugging Face peft: the LLM adapters of such a run, as a peft adapter
directory (adapter_config.json + adapter_model.safetensors, the module
names of HF Llama / Mistral / Qwen2; dense LLMs only):

    python -m mm1_jax.convert --lora_export --source=workdirs/run_lora \
        --output=adapters/run_lora
    # peft.PeftModel.from_pretrained(hf_model, "adapters/run_lora")

A run whose checkpoints hold only what trained rebuilds its base from the
config's init_from (checked against the saved fingerprint) for both.

Hugging Face export: a training run's checkpoint as a transformers directory
(conversion/hf_export.py): the whole model as a LlavaForConditionalGeneration
when it is one (CLIP- or SigLIP-shaped encoder, the "mlp" connector), else
its LLM (LlamaForCausalLM, Qwen2ForCausalLM with q/k/v biases, or
MixtralForCausalLM when every layer is MoE); --export=llm exports the LLM of
any run:

    python -m mm1_jax.convert --to=hf --workdir=workdirs/run [--step=N] \
        --output=exported/run [--dtype=bfloat16] [--export=auto|llm] [--lora_as=merged|peft]
    # transformers.AutoModelForCausalLM.from_pretrained("exported/run")

config.json, generation_config.json (the run's vocabulary's end-of-sequence
id), a LLaVA's preprocessor_config.json, a GGUF vocabulary's tokenizer and
safetensors weights, sharded with an index above 5 GB, written tensor by
tensor. A LoRA run exports merged (default), or with --lora_as=peft its base
LLM plus the adapters as a peft directory in {output}/adapter.

QLoRA: --nf4 writes a converted LLM with the base weights of the linears
--nf4_targets selects (default: every linear of its layer stack, as
model.lora.targets' default) quantised to NF4, tensor by tensor, exactly as a
QLoRA run quantises a float init_from at start-up; such a run then loads it
as it is (its model.lora.targets, block_size and double_quant must match):

    python -m mm1_jax.convert --source=smollm2 --output=checkpoints/smollm2_135m_nf4 \
        --vocab_size=49216 --nf4
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from absl import flags

from mm1_jax import cli

COMPONENT_FILE = "mm1_component.json"
LORA_MERGE_FILE = "mm1_lora_merge.json"
# Where each component sits in MM1Config / the model's params tree; "mm1" is
# the whole model (a LLaVA): its params are the tree itself, its config the
# MM1Config fields it fixes (hf_llava.MM1Parts).
WHOLE_MODEL = "mm1"
CONFIG_FIELD = {"llm": "model.llm", "encoder": "model.encoder", WHOLE_MODEL: "model"}


def define_flags() -> None:
  flags.DEFINE_string("source", None, "HF directory, .gguf, .onnx, or a packaged alias.")
  flags.DEFINE_string("output", None, "New directory (local or gs://) for the params "
                      "checkpoint.")
  flags.DEFINE_enum("format", "auto", ["auto", "safetensors", "gguf", "onnx"],
                    "Source format; auto: from the path.")
  flags.DEFINE_integer("vocab_size", None,
                       "LLM: pad the embedding to this many rows (appended special tokens).",
                       lower_bound=1)
  flags.DEFINE_integer("image_size", None, "Encoder: input resolution (positions are resized).",
                       lower_bound=1)
  flags.DEFINE_integer("feature_layer", None, "Encoder: block whose output is the feature.")
  flags.DEFINE_bool("lora_merge", False, "--source is a LoRA training run (workdir or step "
                    "directory): merge its adapters into a plain params checkpoint.")
  flags.DEFINE_bool("nf4", False, "LLM: store the base weights of the --nf4_targets linears as "
                    "NF4 (QLoRA's 4-bit base; model.lora.quantize=nf4 runs load it as it is).")
  flags.DEFINE_list("nf4_targets", ["llm/blocks/*"], "With --nf4: module path patterns, as "
                    "model.lora.targets.")
  flags.DEFINE_integer("nf4_block_size", 64, "With --nf4: values per absmax.", lower_bound=1)
  flags.DEFINE_bool("lora_export", False, "--source is a LoRA training run (workdir or step "
                    "directory): write its LLM adapters as a Hugging Face peft adapter "
                    "directory (adapter_config.json + adapter_model.safetensors).")
  flags.DEFINE_enum("to", None, ["hf"], "Export the training run --workdir to this format: "
                    "hf = a transformers directory (a LLaVA, or the LLM; see --export).")
  flags.DEFINE_string("workdir", None, "With --to=hf: the training run to export.")
  flags.DEFINE_integer("step", None, "With --to=hf: the checkpoint step (default: the newest).",
                       lower_bound=0)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "With --to=hf: the stored "
                    "weights' dtype.")
  flags.DEFINE_enum("export", "auto", ["auto", "llm"], "With --to=hf: auto = the whole model "
                    "as a LLaVA when it is one, else the LLM; llm = the LLM.")
  flags.DEFINE_enum("lora_as", "merged", ["merged", "peft"], "With --to=hf, a LoRA run: merge "
                    "the adapters into the LLM, or write the base LLM and the adapters as a "
                    "peft directory ({output}/adapter).")


def source_format(source: str) -> str:
  """safetensors | gguf | onnx, from what `source` is."""
  if os.path.isdir(source):
    return "safetensors"
  extension = os.path.splitext(source)[1].lower()
  if extension in (".gguf", ".onnx"):
    return extension[1:]
  if not os.path.exists(source):
    raise FileNotFoundError(f"--source={source}: no such file or directory (or packaged alias).")
  raise ValueError(f"--source={source}: cannot tell the format; give a Hugging Face directory, "
                   "a .gguf or an .onnx file, or set --format.")


def convert(source: str, fmt: str = "auto", vocab_size: int | None = None,
            image_size: int | None = None, feature_layer: int | None = None
            ) -> tuple[str, Any, dict[str, Any]]:
  """Returns (component, its config dataclass, params as nested numpy arrays)."""
  from mm1_jax import paths
  from mm1_jax.conversion import packaged
  if paths.is_remote(source):
    # The safetensors, GGUF and ONNX readers open local files only.
    raise ValueError(f"--source={source}: sources must be local files; copy it to this "
                     "machine first (gsutil cp -r). --output may be gs://.")
  source = packaged.resolve(source)
  fmt = source_format(source) if fmt == "auto" else fmt
  vision = {key: value for key, value in
            (("image_size", image_size), ("feature_layer", feature_layer)) if value is not None}
  if fmt == "gguf":
    if vision:
      raise ValueError(f"{sorted(vision)} apply to image encoders; {source} is an LLM.")
    from mm1_jax.conversion import gguf_llm
    config, params = gguf_llm.convert_gguf_decoder(source, vocab_size=vocab_size)
    return "llm", config, params
  if fmt == "onnx":
    if vocab_size is not None:
      raise ValueError(f"--vocab_size applies to LLMs; {source} is an image encoder.")
    from mm1_jax.conversion import onnx_vit
    config, params = onnx_vit.convert_onnx_dinov2(source, **vision)
    return "encoder", config, params
  from mm1_jax.conversion import hf_directory
  overrides = dict(vision, **({"vocab_size": vocab_size} if vocab_size is not None else {}))
  return hf_directory.convert_hf_directory(source, **overrides)


def config_overrides(component: str, config: Any) -> list[str]:
  """--config.model.<component>.<field>=<value> flags selecting `config`."""
  prefix = CONFIG_FIELD[component]
  flat = []

  def walk(values: dict[str, Any], path: str) -> None:
    for name, value in values.items():
      if isinstance(value, dict):
        walk(value, f"{path}.{name}")
      elif value is not None:
        flat.append(f"--config.{path}.{name}={value}")
  walk(dataclasses.asdict(config), prefix)
  return flat


def _check_new(output: str) -> None:
  from mm1_jax import paths
  if paths.as_path(output).exists():
    raise FileExistsError(f"--output={output} exists; choose a new directory (nothing was "
                          "overwritten).")


def write(output: str, component: str, config: Any, params: dict[str, Any], source: str) -> None:
  """Saves {component: params} (for WHOLE_MODEL: params, which hold the
  components) to `output` (which must not exist) and the component's
  description next to it. Leaves become jax arrays one at a time, so at most
  one converted leaf exists twice."""
  import jax.numpy as jnp

  from mm1_jax import paths
  from mm1_jax.training import checkpoint

  _check_new(output)

  def to_jax(tree):
    for name in list(tree):
      tree[name] = to_jax(tree[name]) if isinstance(tree[name], dict) else jnp.asarray(tree[name])
    return tree
  tree = to_jax(params)
  checkpoint.save_params(paths.as_path(output),
                         tree if component == WHOLE_MODEL else {component: tree})
  paths.write_json(paths.as_path(output) / COMPONENT_FILE,
                   {"component": component, "source": source,
                    "config": dataclasses.asdict(config),
                    "config_overrides": config_overrides(component, config)}, indent=2)


def quantize_llm(params: dict[str, Any], llm: Any, targets: Sequence[str],
                 block_size: int = 64) -> tuple[dict[str, Any], Any]:
  """The LLM params (nested numpy, as convert() gives them) with the base
  weights of the linears `targets` selects quantised to NF4 (models/qlora.py),
  and the LoraConfig a QLoRA run needs to load them (its rank and alpha are
  the run's own). Raises ValueError naming a target that matches nothing or
  a fan-in that is not a multiple of block_size."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from mm1_jax.models import qlora
  from mm1_jax.models.config import LoraConfig
  from mm1_jax.models.decoder import Decoder

  lora = LoraConfig(rank=1, targets=tuple(targets), quantize="nf4", block_size=block_size)
  abstract = nn.unbox(jax.eval_shape(Decoder(llm, lora=lora).init, jax.random.key(0),
                                     jax.ShapeDtypeStruct((1, 1), jnp.int32)))["params"]
  if not qlora.quantized_weights(abstract):
    raise ValueError(f"--nf4_targets={','.join(targets)} selects no linear of the LLM; e.g. "
                     "llm/blocks/* (every linear of its layer stack).")

  def read_kernel(path):
    leaf = params
    for key in path[1:]:  # Paths start with the part, "llm".
      leaf = leaf[key]
    return leaf

  quantized = qlora.quantize_into({"llm": params}, {"llm": abstract}, lora, read_kernel,
                                  lambda array, _: array)
  return quantized["llm"], lora


def _run_workdir(source: str):
  """The workdir of a run given as its workdir or one of its step directories."""
  from mm1_jax import paths
  from mm1_jax.training import checkpoint
  path = paths.as_path(source)
  if not path.exists():
    raise FileNotFoundError(f"--source={source}: no such directory.")
  if (path / checkpoint.CHECKPOINTS_DIR).is_dir():
    return path
  if path.parent.name == checkpoint.CHECKPOINTS_DIR:
    return path.parent.parent
  raise ValueError(f"--source={source}: --lora_merge takes a training run's workdir (with "
                   f"{checkpoint.CHECKPOINTS_DIR}/) or a step directory "
                   f"{{workdir}}/{checkpoint.CHECKPOINTS_DIR}/{{step}}.")


def load_run(source: str):
  """The model config, params and experiment of a training run's checkpoint
  (`source`: its workdir, i.e. the newest step, or a step directory), read
  on the host. The run's {workdir}/config.json gives the experiment; a LoRA
  checkpoint holding only what trained gets its base rebuilt from the
  config's init_from and checked (trainer.load_run_params, as evaluate and
  generate do). Returns (MM1Config, params, experiment)."""
  import json

  import jax

  from mm1_jax import paths, sharding
  from mm1_jax.experiment import Experiment
  from mm1_jax.training import checkpoint, trainer

  config_path = _run_workdir(source) / trainer.CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f"--source={source}: the run's {config_path} is missing; "
                            "it gives the model and its LoRA settings.")
  # Checked for the one host device the merge runs on, not the training
  # mesh (whose device count this machine need not have).
  values = {**json.loads(config_path.read_text()), "mesh": {}}
  experiment = Experiment.from_config(values, num_devices=1, check_init_from=False,
                                      mixture_has_images=lambda *_: True)
  # On the host: a merge needs no accelerator, and the whole tree fits there.
  cpu_mesh = sharding.make_mesh({"data": 1}, devices=jax.devices("cpu")[:1])
  train_step, _ = trainer.build(experiment, mesh=cpu_mesh)
  item_dir, _ = checkpoint._params_location(paths.as_path(source))  # pylint: disable=protected-access
  params = trainer.load_run_params(experiment, train_step, str(item_dir.parent))
  return experiment.model, jax.device_get(params), experiment


def load_lora_run(source: str):
  """load_run of a run with LoRA adapters; ValueError for a plain run."""
  model, params, experiment = load_run(source)
  if not model.lora.enabled:
    raise ValueError(f"--source={source}: the run's config has model.lora.rank=0 (no adapters); "
                     "its checkpoint is already plain: pass it to init_from as it is.")
  return model, params, experiment


def merge_lora_run(source: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads the parameters of a LoRA run's checkpoint (`source`: workdir or step
  directory) and merges the adapters. Returns (plain params tree, description)."""
  from mm1_jax.models import lora

  model, params, _ = load_lora_run(source)
  modules = lora.adapted_module_paths(params)
  merged = lora.merge_lora(params, model.lora)
  description = {"source": source, "lora": dataclasses.asdict(model.lora),
                 "scale": model.lora.scale, "merged_modules": modules,
                 "config_overrides": ["--config.model.lora.rank=0"]}
  return merged, description


def export_lora_run(source: str, output: str) -> int:
  """Writes the LLM adapters of a LoRA run's checkpoint as a Hugging Face peft
  adapter directory (adapter_config.json + adapter_model.safetensors, HF
  Llama / Mistral / Qwen2 module names). Returns the number of tensors."""
  from mm1_jax.conversion import peft_lora

  from mm1_jax.models import lora

  model, params, experiment = load_lora_run(source)
  elsewhere = [path for path in lora.adapted_module_paths(params) if not path.startswith("llm/")]
  if elsewhere:  # A peft adapter directory of an HF LLM has no place for them.
    raise ValueError(f"--source={source}: the run has adapters outside the LLM ({elsewhere[0]}, "
                     f"{len(elsewhere)} in all), which a Hugging Face peft adapter of the LLM "
                     "cannot hold; merge the run instead (--lora_merge).")
  tensors = peft_lora.export_peft_adapters(params["llm"], model.llm, model.lora)
  base = ",".join(experiment.init_from) or None
  peft_lora.write_peft_adapter_dir(output, tensors, model.lora, base_model_name_or_path=base)
  return len(tensors)


def step_source(workdir: str, step: int | None) -> str:
  """The checkpoint to read: workdir (its newest step), or its step directory."""
  from mm1_jax import paths
  from mm1_jax.training import checkpoint
  if step is None:
    return workdir
  checkpoints = paths.as_path(workdir) / checkpoint.CHECKPOINTS_DIR
  step_dir = checkpoints / str(step)
  if not step_dir.is_dir():
    saved = (sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
             if checkpoints.is_dir() else [])
    raise FileNotFoundError(f"--step={step}: {workdir} has no checkpoint of that step (saved "
                            f"steps: {saved or 'none'}).")
  return str(step_dir)


def export_run_to_hf(source: str, output: str, dtype: str = "float32",
                     lora_as: str = "merged", export: str = "auto") -> dict[str, Any]:
  """Writes a training run's checkpoint (`source`: workdir or step directory)
  as a transformers directory (conversion/hf_export.py): export="auto" the
  whole model as a LLaVA when it is one (hf_llava.llava_export_problem), else
  the LLM; "llm" the LLM. A LoRA run merged, or (lora_as="peft") its base LLM
  plus a peft adapter directory in {output}/adapter. Returns a description:
  the HF config, what was written, and why the whole model was not (if not)."""
  from mm1_jax.conversion import hf_export, hf_llava, hf_llm, peft_lora
  from mm1_jax.data import tokenizer
  from mm1_jax.models import lora

  model, params, experiment = load_run(source)
  hf_llm.hf_model_type(model.llm)  # An LLM transformers cannot hold fails before writing.
  not_llava = (hf_llava.llava_export_problem(model) if export == "auto" else
               "--export=llm")
  if not_llava is None and model.lora.enabled and lora_as == "peft":
    not_llava = "--lora_as=peft writes adapters of a causal LM"
  adapters = None
  if model.lora.enabled:
    if lora_as == "peft":
      if model.lora.quantized:
        raise ValueError(f"--workdir={source}: a QLoRA run's base is NF4, which a float "
                         "transformers model does not hold; export it merged (--lora_as=merged).")
      elsewhere = [p for p in lora.adapted_module_paths(params) if not p.startswith("llm/")]
      if elsewhere:  # A peft adapter of the causal LM has no place for them.
        raise ValueError(f"--workdir={source}: the run has adapters outside the LLM "
                         f"({elsewhere[0]}, {len(elsewhere)} in all), which a peft adapter of "
                         "the LLM cannot hold; export it merged (--lora_as=merged).")
      adapters = peft_lora.export_peft_adapters(params["llm"], model.llm, model.lora)
      params = lora.without_lora(params)
    else:
      params = lora.merge_lora(params, model.lora)
  vocabulary = tokenizer.get_vocabulary(experiment.data.vocabulary)
  run_settings = dict(max_position_embeddings=experiment.data.seq_len,
                      eos_token_id=int(vocabulary.eos_id))
  if not_llava is None:
    values = hf_export.export_llava(params, model, output, dtype=dtype, **run_settings)
    written = {"llava": output}
  else:
    values = hf_export.export_llm(params["llm"], model.llm, output, dtype=dtype, **run_settings)
    written = {"llm": output}
    if export == "auto":  # The other parts, as far as transformers has classes for them.
      tower = os.path.join(output, "vision_tower")
      if hf_export.export_vision_tower(params["encoder"], model.encoder, tower, dtype=dtype):
        written["vision_tower"] = tower
      connector = os.path.join(output, "connector")
      hf_export.export_connector(params["connector"], model.connector, model.encoder.width,
                                 model.llm.width, connector)
      written["connector"] = connector
  if hf_export.export_tokenizer(vocabulary, output, experiment.data.seq_len):
    written["tokenizer"] = output
  if adapters is not None:
    adapter_dir = os.path.join(output, "adapter")
    peft_lora.write_peft_adapter_dir(adapter_dir, adapters, model.lora,
                                     base_model_name_or_path=output)
    written["adapter"] = adapter_dir
  return {"config": values, "written": written, "not_llava": not_llava}


def write_merged(output: str, params: dict[str, Any], description: dict[str, Any]) -> None:
  """Saves a merged (plain) params tree to `output` (which must not exist) and
  the description of the merge next to it."""
  from mm1_jax import paths
  from mm1_jax.training import checkpoint

  _check_new(output)
  checkpoint.save_params(paths.as_path(output), params)
  paths.write_json(paths.as_path(output) / LORA_MERGE_FILE, description, indent=2)


def _main_lora_export(FLAGS) -> None:
  if FLAGS.lora_merge:
    raise ValueError("--lora_export and --lora_merge: choose one.")
  count = export_lora_run(FLAGS.source, FLAGS.output)
  print(f"Wrote the LoRA adapters of {FLAGS.source} ({count} tensors) as a peft adapter to "
        f"{FLAGS.output}; load with peft.PeftModel.from_pretrained(hf_model, "
        f"{FLAGS.output!r}).")


def _main_lora_merge(FLAGS) -> None:
  other = [f"--{name}" for name in ("vocab_size", "image_size", "feature_layer")
           if getattr(FLAGS, name) is not None] + (
               [f"--format={FLAGS.format}"] if FLAGS.format != "auto" else [])
  if other:
    raise ValueError(f"{', '.join(other)}: not used by --lora_merge, which keeps the run's "
                     "architecture; drop it.")
  params, description = merge_lora_run(FLAGS.source)
  write_merged(FLAGS.output, params, description)
  print(f"Merged the LoRA adapters of {len(description['merged_modules'])} module(s) of "
        f"{FLAGS.source} into {FLAGS.output}; train from it with model.lora.rank=0 (or new "
        f"adapters) and --config.init_from={FLAGS.output}")


def _main_export(FLAGS) -> None:
  if FLAGS.to != "hf":
    raise ValueError(f"--to={FLAGS.to}: the export formats are: hf.")
  if not FLAGS.workdir or FLAGS.source:
    raise ValueError("--to=hf exports a training run: give --workdir=RUN (not --source).")
  other = [f"--{name}" for name in ("vocab_size", "image_size", "feature_layer")
           if getattr(FLAGS, name) is not None] + [
               f"--{name}" for name in ("lora_merge", "lora_export", "nf4") if getattr(FLAGS, name)]
  if other:
    raise ValueError(f"{', '.join(other)}: not used by --to=hf, which keeps the run's "
                     "architecture; drop it.")
  from mm1_jax import paths
  if paths.is_remote(FLAGS.output):
    raise ValueError(f"--output={FLAGS.output}: --to=hf writes a local directory (transformers "
                     "reads local files); copy it to a bucket afterwards.")
  description = export_run_to_hf(step_source(FLAGS.workdir, FLAGS.step), FLAGS.output,
                                 FLAGS.dtype, FLAGS.lora_as, FLAGS.export)
  architecture = description["config"]["architectures"][0]
  adapter = description["written"].get("adapter")
  if "llava" in description["written"]:
    print(f"Wrote {FLAGS.workdir} (encoder, connector and LLM) as a transformers {architecture} "
          f"({FLAGS.dtype}) to {FLAGS.output}; load with transformers."
          f"LlavaForConditionalGeneration.from_pretrained({FLAGS.output!r}).")
  else:
    print(f"Wrote the LLM of {FLAGS.workdir} as a transformers {architecture} ({FLAGS.dtype}) to "
          f"{FLAGS.output} (not the whole model: {description['not_llava']}); load with "
          f"transformers.AutoModelForCausalLM.from_pretrained({FLAGS.output!r})"
          + (f", its adapters with peft.PeftModel.from_pretrained(model, {adapter!r})"
             if adapter else "") + ".")
    for part, what in (("vision_tower", "the vision tower (transformers.AutoModel)"),
                       ("connector", "the connector (mm1_jax's layout; see its README.md)")):
      if part in description["written"]:
        print(f"Also {what}: {description['written'][part]}")
    if "vision_tower" not in description["written"] and FLAGS.export == "auto":
      print("The encoder is neither CLIP- nor SigLIP-shaped: no transformers vision model "
            "holds it; it is not exported.")
  if "tokenizer" in description["written"]:
    print(f"The run's tokenizer: transformers.AutoTokenizer.from_pretrained({FLAGS.output!r}).")
  else:
    print("The run's tokenizer (the bundled SentencePiece model) is not exported: transformers "
          "would encode some text to other ids; tokenize with mm1_jax.data.tokenizer."
          "get_vocabulary() and pass ids.")


def main(argv: Sequence[str]) -> None:
  cli.start(argv)
  FLAGS = flags.FLAGS
  _check_new(FLAGS.output)  # Before minutes of conversion, not after.
  if FLAGS.to:
    _main_export(FLAGS)
    return
  if not FLAGS.source:
    raise ValueError("--source is required: a Hugging Face directory, .gguf, .onnx or a "
                     "packaged alias (or --to=hf --workdir=RUN to export a run).")
  if FLAGS.lora_export:
    _main_lora_export(FLAGS)
    return
  if FLAGS.lora_merge:
    _main_lora_merge(FLAGS)
    return
  component, config, params = convert(FLAGS.source, FLAGS.format, FLAGS.vocab_size,
                                      FLAGS.image_size, FLAGS.feature_layer)
  import jax
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  overrides = ""
  if FLAGS.nf4:
    if component != "llm":
      raise ValueError(f"--nf4 quantises an LLM; --source={FLAGS.source} is an {component}.")
    params, lora = quantize_llm(params, config, FLAGS.nf4_targets, FLAGS.nf4_block_size)
    targets = ",".join(f"'{t}'" for t in lora.targets)
    overrides = (f" --config.model.lora.quantize=nf4 --config.model.lora.targets=\"({targets},)\""
                 f" --config.model.lora.block_size={lora.block_size} and a rank > 0")
  if component == WHOLE_MODEL:
    overrides = f" and the config_overrides in {FLAGS.output}/{COMPONENT_FILE}"
  write(FLAGS.output, component, config, params, FLAGS.source)
  print(f"Wrote {component} ({count / 1e6:.1f}M parameters) to {FLAGS.output}; train from it "
        f"with --config.init_from={FLAGS.output}{overrides}")


if __name__ == "__main__":
  from mm1_jax.conversion.params_builder import ConversionError
  define_flags()
  # ValueError / KeyError: a source whose tensors or metadata the importer cannot use.
  cli.run(main, required=["output"],
          extra_errors=(ConversionError, ValueError, KeyError, FileExistsError))
