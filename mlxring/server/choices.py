"""The choices of a response: each one's text, tool calls, log probabilities and finish.

A request with `n` choices is `n` independent sequences in the engine's batch (the
same prompt; with a seed, choice i samples with seed + i). `Choice` turns one
sequence's events into what OpenAI's chat and completions APIs return, streamed
(`delta`) or whole (`whole`): text through the tool-call parser (chat with tools),
and with logprobs each token's entry in the chat API's shape, or the completions
API's legacy one.
"""

from __future__ import annotations

from mlxring.engine.handle import Event
from mlxring.server.tools import ToolCalls


def finish(reason: str) -> str:
    """The engine's finish reason as the API's ("cancelled" and "error" are not OpenAI's)."""
    return {"cancelled": "stop", "error": "stop"}.get(reason, reason)


class Choice:
    def __init__(self, index: int, tokenizer, chat: bool, tools: list[dict] | None, top):
        self.index, self.chat, self.tokenizer = index, chat, tokenizer
        self.calls = ToolCalls(tokenizer, tools)
        self.top = top  # None: no logprobs; else the likeliest tokens to report per token
        self.tokens = 0
        self.reason: str | None = None
        self.text: list[str] = []
        self.entries: list[dict] = []  # logprob entries, in the chat API's shape
        self.offsets: list[int] = []  # each entry's place in the text (completions API)
        self.chars = 0  # visible text so far

    def add(self, event: Event) -> tuple[str, list[dict]]:
        """The new visible text and logprob entries of one event."""
        entries = []
        if event.token is not None:
            self.tokens += 1
            if self.top is not None and event.logprob is not None:
                entry = self._entry(event.token, event.logprob, event.top_logprobs)
                self.offsets.append(self.chars)  # the completions API's text_offset
                entries.append(entry)
        text = self.calls.feed(event.text)  # as it is, without tools (completions too)
        if event.finish_reason is not None:
            text += self.calls.finish()
            self.reason = "tool_calls" if self.calls.calls else finish(event.finish_reason)
        self.text.append(text)
        self.chars += len(text)
        self.entries += entries
        return text, entries

    def _token(self, token: int) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "bytes": list(text.encode("utf-8"))}

    def _entry(self, token: int, logprob: float, top) -> dict:
        alternatives = [{**self._token(t), "logprob": lp} for t, lp in (top or [])[: self.top]]
        return {**self._token(token), "logprob": logprob, "top_logprobs": alternatives}

    # the API's shapes ---------------------------------------------------------------
    def logprobs(self, entries: list[dict]) -> dict | None:
        if self.top is None:
            return None
        if self.chat:
            return {"content": entries}
        first = len(self.entries) - len(entries)
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                {a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries
            ],
            "text_offset": self.offsets[first : first + len(entries)],
        }

    def whole(self) -> dict:
        """The choice of a response that is not streamed."""
        text = "".join(self.text)
        if not self.chat:
            return {
                "index": self.index,
                "text": text,
                "finish_reason": self.reason,
                "logprobs": self.logprobs(self.entries),
            }
        content = (text or None) if self.calls.calls else text  # OpenAI: null beside calls
        message = {"role": "assistant", "content": content}
        if self.calls.calls:
            message["tool_calls"] = self.calls.calls
        out = {"index": self.index, "message": message, "finish_reason": self.reason}
        if self.top is not None:
            out["logprobs"] = self.logprobs(self.entries)
        return out

    def delta(self, text: str, entries: list[dict]) -> dict | None:
        """The chunk choice of one event (None when it carries nothing)."""
        done = self.reason is not None
        if not (text or entries or done):
            return None
        if not self.chat:
            return {
                "index": self.index,
                "text": text,
                "finish_reason": self.reason,
                "logprobs": self.logprobs(entries),
            }
        delta: dict = {"role": "assistant", "content": text}
        if done and self.calls.calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(self.calls.calls)]
        out = {"index": self.index, "delta": delta, "finish_reason": self.reason}
        if self.top is not None:
            out["logprobs"] = self.logprobs(entries)
        return out
