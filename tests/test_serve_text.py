"""Streamed text: stop strings cut the text as OpenAI does, and nothing is sent that could still
turn out to be part of a stop string or of a multi-byte character."""

from adapter.tokenizer import Tokenizer
from serve.text import TextStream
from tests.conftest import shared_file


def _tok():
    return Tokenizer(shared_file("stories260K/tokenizer.model"))


def _stream(tok, ids, stop):
    ts = TextStream(tok, stop)
    out = ""
    for i in range(1, len(ids) + 1):
        out += ts.update(ids[:i])
        if ts.stopped:
            break
    return out + ts.finish(), ts


def test_stop_string_cuts_the_text_and_streamed_equals_whole():
    tok = _tok()
    text = "Once upon a time there was a little dog. The dog liked to play."
    ids = tok.encode(text, bos=False)
    whole = tok.decode(ids)
    streamed, ts = _stream(tok, ids, ["little dog"])
    assert ts.stopped and streamed == whole[: whole.index("little dog")]
    streamed, ts = _stream(tok, ids, ["zebra"])
    assert not ts.stopped and streamed == whole


def test_a_possible_stop_prefix_is_held_back_until_resolved():
    tok = _tok()
    ids = tok.encode("The cat sat. The end.", bos=False)
    ts = TextStream(tok, ["sat. The cow"])
    sent, held = "", 0
    for i in range(1, len(ids) + 1):
        sent += ts.update(ids[:i])
        if tok.decode(ids[:i]).endswith("sat. The"):  # could still become the stop string
            assert "sat" not in sent
            held += 1
    assert held == 1
    assert sent + ts.finish() == tok.decode(ids) and not ts.stopped
