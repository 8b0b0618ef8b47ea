"""Reads a GGUF file: its architecture config and its tensors, dequantized once and cached on disk under HF names."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import ModelConfig

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class ModelLoadError(ValueError):
    """The model files are missing, corrupt or of a kind we cannot run."""


def open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated or foreign files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_model_config(reader: gguf.GGUFReader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise ModelLoadError("GGUF file has no general.architecture")

    def get(key: str, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF file lacks {arch}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    if _field(reader, f"{arch}.rope.scaling.type") == "llama3" or "rope_freqs.weight" in names:
        raise ModelLoadError("GGUF Llama 3 RoPE scaling (rope_freqs) is not supported; load the HF directory instead")
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=int(_field(reader, f"{arch}.vocab_size", len(_field(reader, "tokenizer.ggml.tokens", [])))),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads)),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            max_context=int(get("context_length")),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
        )
    except ValueError as e:
        raise ModelLoadError(str(e)) from e


def hf_tensor_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    raise ModelLoadError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores Q/K rows of Llama models interleaved for its RoPE; undo that for rotate-half RoPE."""
    out = w.shape[0]
    head_dim = out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize_all(reader: gguf.GGUFReader, config: ModelConfig) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    # Only Llama-architecture converters permute Q/K; Qwen GGUFs keep HF order (NEOX RoPE in llama.cpp).
    permuted = config.architecture in ("llama", "mistral")
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
        name = hf_tensor_name(t.name)
        shape = tuple(int(x) for x in reversed(t.shape))
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelLoadError(f"tensor {t.name} has unsupported quantization {t.tensor_type.name}") from e
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope_rows(w, config.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope_rows(w, config.num_kv_heads)
        weights[name] = w
    return weights


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("SPECATTN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "specattn"
    )
    return Path(base)


def load_gguf_weights(reader: gguf.GGUFReader, path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Dequantized float32 weights under HF names; the first load writes them to a cache keyed by the file's hash."""
    cache_file = default_cache_dir() / f"gguf-{file_sha256(path)}.safetensors"
    if cache_file.exists():
        try:
            return load_file(cache_file)
        except Exception:  # a cache file cut short by a crash: rebuild it
            cache_file.unlink(missing_ok=True)
    weights = _dequantize_all(reader, config)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    save_file(weights, tmp)
    os.replace(tmp, cache_file)
    return weights
