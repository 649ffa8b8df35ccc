"""The real LLaMA tokenizer and the Alpaca templates."""

import pytest

from adapter.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt
from adapter.tokenizer import Tokenizer
from tests.conftest import shared_file


@pytest.fixture(scope="module")
def llama_tok():
    return Tokenizer(shared_file("tokenizer.model"))


def test_real_tokenizer_shape(llama_tok):
    assert (llama_tok.vocab_size, llama_tok.bos_id, llama_tok.eos_id, llama_tok.pad_id) == (32000, 1, 2, -1)


@pytest.mark.parametrize("inp", ["", "The quick brown fox."])
def test_alpaca_templates_round_trip(llama_tok, inp):
    text = format_prompt("Summarise the sentence.", inp)
    assert text == (PROMPT_WITH_INPUT if inp else PROMPT_NO_INPUT).format(
        instruction="Summarise the sentence.", input=inp
    )
    assert ("### Input:" in text) == bool(inp)
    ids = llama_tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:]
    assert llama_tok.decode(ids[1:-1]) == text


def test_not_a_tokenizer_is_refused(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing.model")
