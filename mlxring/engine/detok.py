"""A sequence's streaming text, and the stop strings it watches for."""

from __future__ import annotations

from mlxring.model.tokenizer import hidden_ids


class Detok:
    """Streaming text of one sequence, holding back what may start a stop string.

    Each token costs time bounded by the stop strings' lengths plus the new text, never
    by the text so far: a new match ends in the new text, so it is searched for in the
    last `longest` characters and the new text only; the held-back end (shorter than the
    longest stop) is looked for only where the last one began (`held`). Several stops
    found at once: the earliest in the text wins. End and special tokens add no text
    (`mlxring.model.tokenizer.hidden_ids`).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.detok = tokenizer.detokenizer
        self.hidden = hidden_ids(tokenizer)
        self.stop = tuple(s for s in stop if s)  # an empty stop string stops nothing
        self.longest = max((len(s) for s in self.stop), default=0)
        self.sent = 0  # text emitted so far; what follows is held back
        self.seen = 0  # the text's length at the last search

    def add(self, token: int | None, final: bool) -> tuple[str, bool]:
        """(new text to emit, whether a stop string ended the sequence)."""
        if token is not None and token not in self.hidden:
            self.detok.add_token(token)
        if final:
            self.detok.finalize()
        text = self.detok.text
        if not self.stop:
            out, self.sent = text[self.sent :], max(self.sent, len(text))
            return out, False
        # The text up to `seen` held no match, so a new one ends past it: search from
        # `longest` characters before it (one of slack for a streaming detokenizer that
        # revises its last character): the tail and the new text only.
        start = max(0, min(self.seen, len(text)) - self.longest)
        self.seen = len(text)
        found = [at for s in self.stop if (at := text.find(s, start)) >= 0]
        if found:
            at = min(found)
            out, self.sent = text[self.sent : at], max(self.sent, at)
            return out, True
        safe = len(text) if final else len(text) - held(text, self.stop, self.sent)
        out, self.sent = text[self.sent : safe], max(self.sent, safe)
        return out, False


def held(text: str, stops: tuple[str, ...], since: int = 0) -> int:
    """The length of the longest end of `text` that is a proper prefix of a stop string.

    `since`: where the last held-back end began (or 0). The new one begins at most one
    character before it (a detokenizer may revise its last character): it extends the
    last one by the new text, or is a part of it. So only ends shorter than the longest
    stop and starting there are compared, each from a stop's first character: time
    bounded by the stops' lengths and the new text, not by the text so far."""
    longest = max((len(s) for s in stops), default=0)
    begin = max(0, since - 1, len(text) - (longest - 1))
    tail = text[begin:]
    best = 0
    for s in stops:
        # longest candidate first: the end of `tail` of length k, for k < len(s)
        i = tail.find(s[0], max(len(tail) - (len(s) - 1), 0))
        while 0 <= i < len(tail) - best:
            if s.startswith(tail[i:]):
                best = len(tail) - i
                break
            i = tail.find(s[0], i + 1)
    return best
