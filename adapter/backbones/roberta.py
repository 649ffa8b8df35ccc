"""RoBERTa: the frozen text backbone of the encoder adapter for extractive QA (docs/encoders.md).

The backbone is transformers' `RobertaModel` (already a dependency; it reads safetensors folders
without unpickling anything), without its pooler: span extraction reads every token's last
hidden state, as `RobertaForQuestionAnswering` does. The tokenizer is the fast (Rust) one beside
the weights: QA needs its offsets mapping to turn answer characters into token positions.

No pretrained RoBERTa is reachable in tests, so `save_random_roberta` writes a toy model and a
byte-level BPE tokenizer trained on a few given texts, in the same folder layout as a real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's ids 0..3 for the first four


def load_roberta(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A frozen `RobertaModel` (no pooler) in eval mode from a `save_pretrained` folder."""
    from transformers import RobertaModel
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"RoBERTa {folder}: no {WEIGHTS_FILE} (a transformers save_pretrained folder with "
            "safetensors weights is expected)"
        )
    hf_logging.set_verbosity_error()  # a QA checkpoint's unused qa_outputs / pooler keys are expected here
    model = RobertaModel.from_pretrained(folder, use_safetensors=True, add_pooling_layer=False)
    if model.config.is_decoder:
        raise ValueError(f"RoBERTa {folder}: a decoder (causal) configuration; the QA adapter needs the encoder")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_roberta_tokenizer(folder: str | Path):
    """The fast tokenizer saved beside the weights; a slow one has no offsets mapping and is refused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(folder))
    if not tok.is_fast:
        raise ValueError(f"{folder}: the tokenizer is not a fast (tokenizers) one; QA needs its offsets mapping")
    return tok


def roberta_shape(model) -> dict:
    """What an adapter file records about the backbone it was trained on."""
    c = model.config
    return {
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
    }


def save_random_roberta(
    folder: str | Path,
    texts: list[str],
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_length: int = 64,
    vocab_size: int = 400,
    seed: int = 0,
) -> Path:
    """A random RoBERTa and a byte-level BPE tokenizer trained on `texts`, in transformers' folder
    layout (`AutoTokenizer` / `RobertaModel.from_pretrained` read it). Plumbing, not skill."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaConfig, RobertaModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS))
    ids = {t: bpe.token_to_id(t) for t in SPECIAL_TOKENS}
    # <s> A </s></s> B </s>, offsets trimmed of the leading space byte: RoBERTa's own post-processing
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", ids["</s>"]), ("<s>", ids["<s>"]), trim_offsets=True, add_prefix_space=False
    )
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "RobertaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "sep_token": "</s>",
                "cls_token": "<s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "mask_token": "<mask>",
                "add_prefix_space": False,
                "trim_offsets": True,
                "model_max_length": max_length,
            },
            indent=1,
        )
    )

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_length + 2,  # RoBERTa positions start after pad_token_id
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
    )
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder
