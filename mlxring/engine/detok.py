"""A sequence's streaming text, and the stop strings it watches for."""

from __future__ import annotations


class Detok:
    """Streaming text of one sequence, holding back what may start a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.detok = tokenizer.detokenizer
        self.stop = stop
        self.sent = 0

    def add(self, token: int | None, final: bool) -> tuple[str, bool]:
        """(new text to emit, whether a stop string ended the sequence)."""
        if token is not None:
            self.detok.add_token(token)
        if final:
            self.detok.finalize()
        text = self.detok.text
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                out, self.sent = text[self.sent : at], at
                return out, True
        hold = (
            0
            if final
            else max(
                (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
            )
        )
        safe = len(text) - hold
        out, self.sent = text[self.sent : safe], max(self.sent, safe)
        return out, False
