"""Generated tokens -> text for a client: incremental (for streaming) and cut at stop strings.

Text is sent only when it is final: a partial UTF-8 character (the decoder shows U+FFFD) and any
tail that could still grow into a stop string are held back. When a stop string appears, the text
ends just before it (the stop string is not returned, as OpenAI does).
"""

from __future__ import annotations

from adapter.tokenizer import TextTokenizer


class TextStream:
    def __init__(self, tok: TextTokenizer, stop: list[str] | None = None):
        self.tok = tok
        self.stop = [s for s in (stop or []) if s]
        self.sent = ""
        self.text = ""
        self.stopped = False

    def update(self, tokens: list[int]) -> str:
        """Text that became final since the last call; sets `stopped` when a stop string matched."""
        if self.stopped:
            return ""
        text = self.tok.decode(tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._advance(self.text)
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text[: len(text) - self._held(text)])

    def finish(self) -> str:
        """The rest, once the row is done (a held-back tail that never became a stop string)."""
        return self._advance(self.text)

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _advance(self, final: str) -> str:
        if not final.startswith(self.sent) or len(final) <= len(self.sent):
            return ""
        delta, self.sent = final[len(self.sent) :], final
        return delta
