"""The BERT family: the frozen text backbones of the encoder adapter for extractive QA
(docs/encoders.md). transformers' `BertModel` and `RobertaModel` share one attention layout
(`encoder.layer[i].attention.self` with `query` / `key` / `value`, returning the context before
the output dense layer), so one wrapper (adapter/backbones/adapted.py) serves both; which class a
checkpoint folder needs comes from its config.json `model_type`.

Both load without their pooler: span extraction reads every token's last hidden state, as
`BertForQuestionAnswering` / `RobertaForQuestionAnswering` do. The tokenizer is the fast (Rust)
one that ships with the checkpoint (WordPiece for BERT, byte-level BPE for RoBERTa): QA needs its
offsets mapping to turn answer characters into token positions. BERT's tokenizer also gives
token_type_ids (0 for the question, 1 for the context), which BERT's segment embeddings read;
RoBERTa's gives none (its one segment embedding is used for every token).

Real weights here: all-MiniLM-L6-v2 (a `BertModel`, docs/encoders.md); no pretrained RoBERTa is
reachable. For tests, `save_random_bert` / `save_random_roberta` write a toy model with a WordPiece /
byte-level BPE tokenizer trained on a few given texts, in the same folder layout as a real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
MODEL_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel"}  # config.json model_type -> transformers class
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's ids 0..3 for the first four


def model_type(folder: str | Path) -> str:
    """The checkpoint's config.json `model_type`, checked to be one of the family."""
    config = Path(folder) / "config.json"
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{folder}: no readable config.json ({e})") from None
    if kind not in MODEL_CLASSES:
        raise ValueError(
            f"{config}: model_type {kind!r} is not of the BERT family this adapter knows ({', '.join(MODEL_CLASSES)})"
        )
    return kind


def load_bert_family(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A frozen `BertModel` / `RobertaModel` (by config.json `model_type`, no pooler) in eval mode
    from a `save_pretrained` folder with safetensors weights."""
    import transformers
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    kind = model_type(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{kind} {folder}: no {WEIGHTS_FILE} (a transformers save_pretrained folder with "
            "safetensors weights is expected)"
        )
    hf_logging.set_verbosity_error()  # a checkpoint's unused qa_outputs / pooler keys are expected here
    model_class = getattr(transformers, MODEL_CLASSES[kind])
    model = model_class.from_pretrained(folder, use_safetensors=True, add_pooling_layer=False)
    if model.config.is_decoder:
        raise ValueError(f"{kind} {folder}: a decoder (causal) configuration; the QA adapter needs the encoder")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(folder: str | Path):
    """The fast tokenizer saved with the checkpoint; a slow one has no offsets mapping and is refused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(folder))
    if not tok.is_fast:
        raise ValueError(f"{folder}: the tokenizer is not a fast (tokenizers) one; QA needs its offsets mapping")
    return tok


def bert_family_shape(model) -> dict:
    """What an adapter file records about the backbone it was trained on (its kind is the model_type)."""
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


def save_random_bert(
    folder: str | Path,
    texts: list[str],
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_length: int = 64,
    vocab_size: int = 200,
    seed: int = 0,
) -> Path:
    """A random BERT and a lower-casing WordPiece tokenizer trained on `texts`, in transformers'
    folder layout (as all-MiniLM-L6-v2's: `[CLS] A [SEP] B [SEP]`, token_type_ids 0 / 1). Plumbing, not skill."""
    from tokenizers import BertWordPieceTokenizer, processors
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=specials)
    ids = {t: wordpiece.token_to_id(t) for t in specials}
    wordpiece.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    wordpiece.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "BertTokenizer",
                "do_lower_case": True,
                "unk_token": "[UNK]",
                "sep_token": "[SEP]",
                "pad_token": "[PAD]",
                "cls_token": "[CLS]",
                "mask_token": "[MASK]",
                "model_max_length": max_length,
            },
            indent=1,
        )
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=wordpiece.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_length,
        pad_token_id=ids["[PAD]"],
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder
