"""SentencePiece tokenizer as LLaMA uses it: BOS/EOS added by us, never by the model file."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


class Tokenizer:
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

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Plain pieces, no BOS/EOS; one C++ call for the whole list. num_threads -1 uses every
        core; a Ray worker passes 1 and lets Ray's scheduling provide the parallelism."""
        return self.sp.Encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])
