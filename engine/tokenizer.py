"""Tokenization, chat templating and streaming detokenization.

Two sources are supported: the tokenizer embedded in a GGUF file (byte-level BPE only) and a
Hugging Face model directory (``tokenizer.json`` + ``tokenizer_config.json``). Both end up as a
``tokenizers.Tokenizer``, so encoding/decoding behaves identically whichever source was used.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

if TYPE_CHECKING:
    import gguf

# GGUF token types (gguf.TokenType); only these two need special handling for byte-level BPE.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# The split regex Llama-3 ships in tokenizer.json; Qwen2 differs only in splitting digits singly.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level_alphabet() -> dict[str, int]:
    """The character byte-level BPE writes for each byte (GPT-2's table: printable bytes stand for themselves, the
    rest take the characters from U+0100 on), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class _PreTokenization:
    """How the original HF tokenizer splits text before BPE, for one ``tokenizer.ggml.pre`` value."""

    pre_tokenizer: pre_tokenizers.PreTokenizer
    normalizer: normalizers.Normalizer | None = None
    # Llama-3 looks a whole pre-token up in the vocab before merging; the result can differ.
    ignore_merges: bool = False


def _pre_tokenization(pre: str) -> _PreTokenization:
    """Mirror of the HF pre-tokenizers behind the ``tokenizer.ggml.pre`` names llama.cpp writes."""
    if pre in ("smollm", "starcoder"):
        return _PreTokenization(
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        )
    if pre in ("gpt-2", "phi-2"):
        return _PreTokenization(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    if pre in ("llama-bpe", "llama3", "llama-v3", "qwen2"):
        is_qwen = pre == "qwen2"
        return _PreTokenization(
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(
                        Regex(_QWEN2_SPLIT if is_qwen else _LLAMA3_SPLIT), behavior="isolated"
                    ),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            ),
            normalizer=normalizers.NFC() if is_qwen else None,
            ignore_merges=not is_qwen,
        )
    raise ValueError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}")


def _bos_processor(bos_token: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, bos_id)]
    )


def _raise_exception(message: str) -> None:
    # Templates call raise_exception(...) to reject malformed conversations (e.g. bad role order).
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    # Llama-3.x templates stamp the current date through this HF-provided helper.
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    # Same environment settings as transformers' apply_chat_template, so templates render identically.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids plus the model's chat template."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        eos_token_ids: frozenset[int],
        bos_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
    ) -> None:
        self._tok = tok
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        # Token texts, exposed to chat templates as bos_token / eos_token.
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        # Compiled up front so a broken template fails at load time, not on the first request.
        self._template = _compile_template(chat_template) if chat_template is not None else None

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            field = fields.get(key)
            return default if field is None else field.contents()

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer.ggml.model={model!r}: only byte-level BPE ('gpt2') is supported"
            )
        pre = _pre_tokenization(get("tokenizer.ggml.pre", "<missing>"))

        tokens: list[str] = get("tokenizer.ggml.tokens")
        token_types: list[int] = get("tokenizer.ggml.token_type", [])
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges", [])]
        tok = tokenizers.Tokenizer(
            models.BPE(
                vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre.ignore_merges
            )
        )
        tok.pre_tokenizer = pre.pre_tokenizer
        if pre.normalizer is not None:
            tok.normalizer = pre.normalizer
        tok.decoder = decoders.ByteLevel()
        # Control/user-defined tokens must be matched whole in text (never BPE-split); only control
        # tokens are "special", i.e. dropped by decode(skip_special_tokens=True).
        tok.add_tokens(
            [
                AddedToken(tokens[i], special=t == _TOKEN_TYPE_CONTROL, normalized=False)
                for i, t in enumerate(token_types)
                if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
            ]
        )

        bos_id: int | None = get("tokenizer.ggml.bos_token_id")
        add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
        if add_bos and bos_id is not None:
            tok.post_processor = _bos_processor(tokens[bos_id], bos_id)
        eos_id: int | None = get("tokenizer.ggml.eos_token_id")
        # llama.cpp also stops on the end-of-turn token when the file names one separately.
        eos_ids = {eos_id, get("tokenizer.ggml.eot_token_id")} - {None}
        return cls(
            tok,
            eos_token_ids=frozenset(eos_ids),
            bos_token_id=bos_id,
            add_bos=add_bos,
            chat_template=get("tokenizer.chat_template"),
            bos_token=None if bos_id is None else tokens[bos_id],
            eos_token=None if eos_id is None else tokens[eos_id],
        )

    @classmethod
    def from_hf_dir(cls, path: pathlib.Path) -> Tokenizer:
        path = pathlib.Path(path)
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))

        def read_json(name: str) -> dict[str, Any]:
            file = path / name
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

        config = read_json("tokenizer_config.json")
        generation_config = read_json("generation_config.json")

        def special_text(key: str) -> str | None:
            # tokenizer_config stores special tokens either as a string or as an AddedToken dict.
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        bos_token, eos_token = special_text("bos_token"), special_text("eos_token")
        bos_id = None if bos_token is None else tok.token_to_id(bos_token)
        # generation_config may list extra stop ids (e.g. Llama-3's <|eot_id|>), as an int or a list.
        generation_eos = generation_config.get("eos_token_id", [])
        eos_ids = {None if eos_token is None else tok.token_to_id(eos_token)}
        eos_ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])

        # tokenizer.json's post-processor is what actually inserts BOS; make it agree with the config.
        processor_adds_bos = bos_id is not None and tok.encode("").ids[:1] == [bos_id]
        add_bos = bos_id is not None and bool(config.get("add_bos_token", processor_adds_bos))
        if add_bos and not processor_adds_bos:
            tok.post_processor = _bos_processor(bos_token, bos_id)
        elif processor_adds_bos and not add_bos:
            tok.post_processor = None

        return cls(
            tok,
            eos_token_ids=frozenset(eos_ids - {None}),
            bos_token_id=bos_id,
            add_bos=add_bos,
            chat_template=cls._hf_chat_template(path, config),
            bos_token=bos_token,
            eos_token=eos_token,
        )

    def save_pretrained(self, path: pathlib.Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so from_hf_dir reads back the same tokenizer."""
        path = pathlib.Path(path)
        self._tok.save(str(path / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "add_bos_token": self.add_bos}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    @staticmethod
    def _hf_chat_template(path: pathlib.Path, config: dict[str, Any]) -> str | None:
        # Newer checkpoints keep the template in its own file; older ones inline it in the config,
        # sometimes as a list of named templates of which "default" is the chat one.
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        return template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``; special-token strings in it (e.g. ``<|im_start|>``) become single ids.

        ``add_special_tokens`` controls the automatically inserted tokens (BOS when ``add_bos``); pass
        False for text that already carries them, such as a chat template rendering ``bos_token``.
        """
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; incomplete UTF-8 sequences come out as U+FFFD."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Text of a single token with special tokens kept (bytes of a partial character show as U+FFFD)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes, a partial character's included (what OpenAI's logprobs report as `bytes`): read off
        its byte-level piece, or its text where the tokenizer is not byte-level."""
        piece = self._tok.id_to_token(token_id)
        if piece is not None and isinstance(self._tok.decoder, decoders.ByteLevel) and all(c in _BYTE_OF_CHAR for c in piece):
            return [_BYTE_OF_CHAR[c] for c in piece]
        if piece is not None and _BYTE_FALLBACK.fullmatch(piece):  # SentencePiece's byte fallback: <0xE6>
            return [int(piece[3:5], 16)]
        return list(self.token_text(token_id).encode())

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) into the model's prompt text."""
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


# How many prompt tokens to decode ahead of the first generated one. Decoding a token together with
# some left context matters for decoders that alter a sequence's start (e.g. strip a leading space).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; correct when a multi-byte UTF-8 character
    spans tokens (holds back until complete).

    Keeps two offsets into the id list: text up to ``_read_offset`` has been emitted, and
    ``_prefix_offset`` starts a short window of already-emitted tokens used as decoding context. Each
    step decodes the window with and without the unread tokens and emits the difference, unless it
    ends in U+FFFD, which means a character's bytes are still incomplete.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids)
        self._prefix_offset = max(len(self._ids) - _PROMPT_CONTEXT_TOKENS, 0)
        self._read_offset = len(self._ids)
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        """Append generated ids; return the newly completed text (may be "")."""
        self._ids.extend(new_ids)
        delta = self._unread_text()
        # A trailing U+FFFD is a character whose remaining bytes are still to come.
        return "" if delta.endswith("\ufffd") else self._emit(delta)

    def flush(self) -> str:
        """At the end of generation, emit text still held back (incomplete bytes as U+FFFD), so
        that the concatenated deltas equal the plain decode of the generated ids."""
        return self._emit(self._unread_text())

    def _unread_text(self) -> str:
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], skip)
        window_text = decode(self._ids[self._prefix_offset :], skip)
        # Not longer (e.g. only skipped special tokens arrived): nothing new to show yet.
        return window_text[len(prefix_text) :] if len(window_text) > len(prefix_text) else ""

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta
