"""Reads an HF model directory: config.json and the safetensors weights (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, RopeScaling
from .gguf_loader import ModelLoadError

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def hf_model_config(model_dir: Path) -> ModelConfig:
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError as e:
        raise ModelLoadError(f"{model_dir} has no config.json") from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{model_dir / 'config.json'} is not valid JSON: {e}") from e
    archs = raw.get("architectures") or []
    arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(f"unsupported architecture {archs}; supported: {', '.join(_ARCHITECTURES)}")
    num_heads = raw["num_attention_heads"]
    scaling = None
    rs = raw.get("rope_scaling") or raw.get("rope_parameters")
    rope_type = (rs or {}).get("rope_type", (rs or {}).get("type"))
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    elif rope_type not in (None, "default"):
        raise ModelLoadError(f"unsupported rope scaling {rope_type!r}")
    rope_theta = raw.get("rope_theta", (rs or {}).get("rope_theta", 10000.0))
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_context=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            rope_scaling=scaling,
        )
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{model_dir / 'config.json'}: {e}") from e


def load_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(model_dir / name, framework="pt") as f:
                for key in f.keys():
                    weights[key] = f.get_tensor(key)
        except Exception as e:
            raise ModelLoadError(f"cannot read {model_dir / name}: {e}") from e
    return weights
