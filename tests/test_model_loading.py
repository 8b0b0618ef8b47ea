"""Loaders and the decoder against transformers: GGUF and safetensors give the same model, every family runs right."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from specattn.engine.config import CacheConfig, EngineConfig
from specattn.engine.engine import LLMEngine
from specattn.engine.gguf_loader import ModelLoadError
from specattn.engine.loader import embedded_model_path, load_model_files
from specattn.engine.runner import SequenceInput
from specattn.engine.sampling import SamplingParams
from tests.hf_dirs import write_hf_dir, write_tiny_random_dir

transformers = pytest.importorskip("transformers")

PROMPT = "The history of the Roman Empire spans many centuries, and 12345 numbers"


def _our_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Logits of every prompt position, computed in two chunks so the second attends to a cached prefix."""
    pages: list[int] = []
    assert engine.cache.allocator.grow(pages, len(ids))
    cut = len(ids) // 2
    first = engine.runner.run([SequenceInput(ids[:cut], 0, pages, num_logits=cut)]).logits[0]
    second = engine.runner.run([SequenceInput(ids[cut:], cut, pages, num_logits=len(ids) - cut)]).logits[0]
    engine.cache.allocator.release(pages)
    return torch.cat([first, second])


def _hf_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _engine(files) -> LLMEngine:
    return LLMEngine(EngineConfig(cache=CacheConfig(num_pages=64)), files)


@pytest.mark.slow
def test_gguf_equals_safetensors_and_transformers(smollm_files, tmp_path):
    ids = smollm_files.tokenizer.encode(PROMPT)
    gguf_logits = _our_logits(_engine(smollm_files), ids)
    hf_dir = write_hf_dir(tmp_path / "smollm", smollm_files.config, smollm_files.weights, smollm_files.tokenizer)
    hf_files = load_model_files(str(hf_dir))
    assert hf_files.config == smollm_files.config
    torch.testing.assert_close(_our_logits(_engine(hf_files), ids), gguf_logits)
    # transformers uses rotate-half RoPE: agreeing with it proves the GGUF Q/K rows were un-permuted.
    reference = _hf_logits(hf_dir, ids)
    torch.testing.assert_close(gguf_logits, reference, atol=2e-3, rtol=1e-3)
    assert (gguf_logits.argmax(-1) == reference.argmax(-1)).all()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_random_family_matches_transformers(smollm_files, tmp_path, family):
    model_dir = write_tiny_random_dir(tmp_path / family, family, smollm_files.tokenizer)
    files = load_model_files(str(model_dir))
    assert files.config.architecture == family
    engine = _engine(files)
    # long enough that llama3 RoPE scaling (original context 64) changes the result
    ids = smollm_files.tokenizer.encode(PROMPT * 6)[:150]
    torch.testing.assert_close(_our_logits(engine, ids), _hf_logits(model_dir, ids), atol=1e-4, rtol=1e-4)
    # the engine's greedy decoding equals transformers' generate
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = model.generate(torch.tensor([ids[:20]]), max_new_tokens=8, do_sample=False, eos_token_id=None)[0, 20:].tolist()
    ours = engine.generate([ids[:20]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert ours == ref


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_files(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_gguf_is_a_clear_error(tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    if damage == "garbage":
        bad.write_bytes(b"this is not a gguf file at all" * 100)
    else:
        with open(embedded_model_path(), "rb") as f:
            bad.write_bytes(f.read(5_000_000))
    with pytest.raises(ModelLoadError):
        load_model_files(str(bad))


def test_unsupported_architecture_is_a_clear_error(smollm_files, tmp_path):
    model_dir = write_hf_dir(tmp_path / "m", smollm_files.config, {}, smollm_files.tokenizer)
    cfg = (model_dir / "config.json").read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel")
    (model_dir / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_model_files(str(model_dir))


def test_missing_weight_is_a_clear_error(smollm_files, tmp_path):
    weights = {k: v for k, v in smollm_files.weights.items() if k != "model.layers.3.mlp.up_proj.weight"}
    model_dir = write_hf_dir(tmp_path / "m", smollm_files.config, weights, smollm_files.tokenizer)
    with pytest.raises(ModelLoadError, match="model.layers.3.mlp.up_proj.weight"):
        _engine(load_model_files(str(model_dir)))


def test_second_gguf_load_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECATTN_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "model.gguf"
    shutil.copy(embedded_model_path(), copy)
    first = load_model_files(str(copy))
    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1
    second = load_model_files(str(copy))
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(first.weights[name], second.weights[name])
