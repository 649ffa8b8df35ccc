"""Tokenizers beyond SentencePiece: ids equal to transformers' tokenizer for the same GGUF file,
the model's special ids, tokenizer.json folders, the picking factory, and chat templates rendered
in a sandbox."""

from __future__ import annotations

import json

import pytest

from adapter.chat_template import ChatTemplateError, render_chat_template
from adapter.loader import tokenizer_for
from adapter.settings import ModelSource
from adapter.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from tests.conftest import shared_file
from tests.gguf_files import CHAT_TEMPLATE, tiny_bpe, write_tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is the oracle for GGUF tokenizers")

TEXTS = [
    "Hello world",
    "Café naïve résumé — déjà vu, señor",
    "東京は日本の首都です。中文测试",
    "emoji 🎉🚀 👩\u200d👩\u200d👧 done",
    "a   b\t\tc\n\n\nd    ",
    "   leading and trailing   ",
    "def f(x):\n    return x**2  # square\n",
    "it's we'll they'd I'M",
    "<|im_start|>user\nhi<|im_end|>\n",
    "year 2024, pi 3.14159",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
]


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def test_tiny_gguf_ids_equal_transformers(tiny_gguf):
    ours, ref = load_tokenizer(tiny_gguf), hf_tokenizer(tiny_gguf)
    assert isinstance(ours, HFTokenizer) and ours.vocab_size == len(ref)
    for text in TEXTS:
        ids = ours.encode(text, bos=False)
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert ours.encode_batch(TEXTS) == ours.encode_batch(TEXTS, num_threads=1) == [ours.pieces(t) for t in TEXTS]


def test_special_ids_come_from_the_metadata(tiny_gguf):
    tok = load_tokenizer(tiny_gguf)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 0, False)
    # The file says no BOS: a sequence starts with the text itself, as transformers encodes it.
    assert tok.encode("Hello", bos=True, eos=True) == tok.pieces("Hello") + [2]
    assert tok.pieces("<|im_start|>") == [1]  # a control token stays whole


def test_tiny_chat_template_equals_transformers(tiny_gguf):
    ours, ref = load_tokenizer(tiny_gguf), hf_tokenizer(tiny_gguf)
    assert ours.chat_template == CHAT_TEMPLATE
    for add in (True, False):
        want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)
        assert ours.render_chat(MESSAGES, add_generation_prompt=add) == want


def test_tokenizer_json_folder(tmp_path):
    """A Hugging Face folder: tokenizer.json + tokenizer_config.json (special tokens, template)."""
    tok = tiny_bpe()
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(tmp_path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (1, 2, -1, False)
    for text in TEXTS:
        assert ours.pieces(text) == ref(text, add_special_tokens=False).input_ids
    assert ours.render_chat(MESSAGES[:2]).endswith("<|im_start|>assistant\n")


def test_factory_picks_by_file(tiny_gguf, tmp_path):
    assert isinstance(load_tokenizer(shared_file("tokenizer.model")), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tiny_gguf), HFTokenizer)
    sp = tokenizer_for(ModelSource(base=str(shared_file("stories260K/params.json").parent)))
    assert isinstance(sp, SentencePieceTokenizer) and sp.vocab_size == 512 and sp.add_bos
    assert sp.encode("Hi")[0] == sp.bos_id
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="carries no tokenizer: set model.tokenizer"):
        tokenizer_for(ModelSource(base=str(tmp_path)))


def test_unsupported_gguf_pre_tokenizer_is_refused_by_name(tmp_path):
    path = tmp_path / "q.gguf"
    write_tiny_llama(path, pre="qwen2")
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
        load_tokenizer(path)


def test_chat_template_runs_in_a_sandbox():
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat_template(escape, MESSAGES)
    refuse = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        render_chat_template(refuse, MESSAGES)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", MESSAGES)


# --- the real SmolLM2 vocabulary ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_file):
    return load_tokenizer(smollm2_file), hf_tokenizer(smollm2_file)


def test_real_smollm2_ids_equal_transformers(smollm2_tokenizers):
    ours, ref = smollm2_tokenizers
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (49152, 1, 2, 2, False)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, text
    for add in (True, False):
        want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)
        assert ours.render_chat(MESSAGES, add_generation_prompt=add) == want


def test_real_smollm2_cuts_digits_apart_first_as_llama_cpp(smollm2_tokenizers):
    """The file's pre-tokenizer is 'smollm': llama.cpp splits every digit off before the GPT-2 regex
    (llama-vocab.cpp). So a run of spaces before a digit stays one run ('ĠĠ'), while transformers'
    GGUF conversion, which uses the plain GPT-2 regex for this file, leaves a space attached to the
    digit's chunk. The two agree everywhere else (test above); here we follow llama.cpp (see
    docs/models.md: SmolLM2's own tokenizer.json is not reachable here to settle it)."""
    ours, ref = smollm2_tokenizers
    double_space = ours.tok.token_to_id("ĠĠ")
    assert ours.pieces("x  12") == [
        ours.tok.token_to_id("x"),
        double_space,
        ours.tok.token_to_id("1"),
        ours.tok.token_to_id("2"),
    ]
    assert ref("x  12", add_special_tokens=False).input_ids != ours.pieces("x  12")
