"""Tokenizers: one interface, two implementations, picked by what the base model carries.

    SentencePieceTokenizer  a SentencePiece `tokenizer.model` (LLaMA, LLaMA-2, llama2.c models)
    HFTokenizer             Hugging Face `tokenizers`: a `tokenizer.json`, or the byte-level BPE
                            vocabulary and merges inside a GGUF file (SmolLM2, ...)

`load_tokenizer(path)` picks by file; `adapter.loader.tokenizer_for(source)` by config (the base's
own tokenizer when `model.tokenizer` is not set). BOS/EOS/pad ids come from the model's metadata,
and so does whether a sequence starts with BOS (`add_bos`): LLaMA's SentencePiece models want it,
SmolLM2's BPE does not. A tokenizer also carries the base's chat template when it has one
(adapter/chat_template.py). See docs/models.md.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from adapter.chat_template import render_chat_template
from adapter.gguf_base import field, is_gguf, open_gguf


class TextTokenizer(ABC):
    path: Path  # the file it was read from (a fingerprint of the data it tokenized)
    bos_id: int
    eos_id: int
    pad_id: int  # -1: no pad token (batches use masks)
    vocab_size: int
    add_bos: bool = True  # whether a sequence starts with BOS (encode(bos=True) adds it only then)
    chat_template: str | None = None

    @abstractmethod
    def pieces(self, text: str) -> list[int]:
        """Plain ids of `text`: no BOS/EOS added."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; control tokens (BOS, EOS, chat markers) are left out."""

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Plain ids, no BOS/EOS. num_threads -1 uses every core; a Ray worker passes 1 and lets
        Ray's scheduling provide the parallelism."""
        return [self.pieces(t) for t in texts]

    @property
    def bos_prefix(self) -> list[int]:
        """What a sequence starts with: [bos_id], or nothing for a model trained without BOS."""
        return [self.bos_id] if self.add_bos and self.bos_id >= 0 else []

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return (self.bos_prefix if bos else []) + self.pieces(text) + ([self.eos_id] if eos else [])

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role", "content"}]) in the base's own chat format."""
        if self.chat_template is None:
            raise ValueError(f"{self.path} carries no chat template")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **self.special_token_texts())

    def special_token_texts(self) -> dict[str, str]:
        return {}


class SentencePieceTokenizer(TextTokenizer):
    """SentencePiece as LLaMA uses it: BOS/EOS added by us, never by the model file. No chat template:
    LLaMA-2-chat's template writes BOS as text, which SentencePiece would spell out."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            raise ValueError(f"{path} is not a SentencePiece model: {e}") from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for LLaMA: no pad token, batches use masks
        self.vocab_size: int = self.sp.vocab_size()

    def pieces(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.Encode(texts, out_type=int, num_threads=num_threads)  # one C++ call for the list

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


Tokenizer = SentencePieceTokenizer  # the old name: `Tokenizer(path)` still opens a tokenizer.model

# How llama.cpp splits text before byte-level BPE, by the GGUF's `tokenizer.ggml.pre` (its
# llama-vocab.cpp): GPT-2's regex; SmolLM / StarCoder first cut every digit apart; LLaMA-3's regex.
_GPT2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": lambda: _GPT2,
    "gpt2": lambda: _GPT2,
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "codeshell"),
        lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), _GPT2]),
    ),
    **dict.fromkeys(
        ("llama-bpe", "llama3", "llama-v3"),
        lambda: pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    ),
}
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}  # llama.cpp takes a whole word that is a token as it is
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


class HFTokenizer(TextTokenizer):
    """A Hugging Face `tokenizers.Tokenizer` with the model's special ids and chat template."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        path: Path,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        add_bos: bool,
        chat_template: str | None,
    ):
        self.tok, self.path = tok, Path(path)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos, self.chat_template = add_bos, chat_template
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def pieces(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        if num_threads == 1:  # the batch call runs on the library's own thread pool
            return [self.pieces(t) for t in texts]
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def special_token_texts(self) -> dict[str, str]:
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {k: self.tok.id_to_token(i) or "" for k, i in names.items() if i >= 0}

    @classmethod
    def from_gguf(cls, path: str | Path) -> HFTokenizer:
        """The byte-level BPE (`tokenizer.ggml.model` gpt2) a GGUF file describes, as llama.cpp runs it."""
        path = Path(path)
        reader = open_gguf(path)
        kind = field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"{path}: GGUF tokenizer {kind!r} is not supported (byte-level BPE 'gpt2' only); "
                "give the model's tokenizer file with model.tokenizer"
            )
        pre = field(reader, "tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(
                f"{path}: GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(_PRE_TOKENIZERS))}); "
                "give the model's tokenizer.json with model.tokenizer"
            )
        tokens = field(reader, "tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
        types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES)
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, ...) are matched whole in text, as the chat template writes them.
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
        )
        tok.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
        )

        def token_id(key):
            value = field(reader, f"tokenizer.ggml.{key}")
            return -1 if value is None else int(value)

        return cls(
            tok,
            path,
            bos_id=token_id("bos_token_id"),
            eos_id=token_id("eos_token_id"),
            pad_id=token_id("padding_token_id"),
            add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
            chat_template=field(reader, "tokenizer.chat_template"),
        )

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> HFTokenizer:
        """A Hugging Face `tokenizer.json`, with `tokenizer_config.json` beside it for the special
        tokens, whether BOS starts a sequence, and the chat template."""
        path = Path(path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        config_file = path.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}

        def token_id(key) -> int:
            value = config.get(key)
            text = value.get("content") if isinstance(value, dict) else value
            found = tok.token_to_id(text) if text else None
            return -1 if found is None else found

        bos_id = token_id("bos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # as the file's own post-processor does
            with_special = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id >= 0 and bool(with_special) and with_special[0] == bos_id
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, path, bos_id, token_id("eos_token"), token_id("pad_token"), bool(add_bos), template)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer a file (or a checkpoint folder) holds: a GGUF's own vocabulary, a
    `tokenizer.json`, or a SentencePiece model."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise FileNotFoundError(f"{path} holds no tokenizer (tokenizer.json or tokenizer.model)")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if is_gguf(path):
        return HFTokenizer.from_gguf(path)
    if path.suffix == ".json":
        return HFTokenizer.from_tokenizer_json(path)
    return SentencePieceTokenizer(path)
