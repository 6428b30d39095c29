"""Tool calls in a reply's text: held back while streaming, parsed into OpenAI's `tool_calls`.

A model whose chat template renders tools writes each call between the markers its
tokenizer declares (mlx-lm's `TokenizerWrapper.tool_call_start` / `tool_call_end`,
found from the template) and mlx-lm's parser for that format (`tokenizer.tool_parser`)
reads what is between them as {"name", "arguments"}. `ToolCalls` sits between the
engine's text and the client: text outside the markers flows on (less an end that
could begin a marker), text inside them is kept, and at the end every call is parsed.
A call that does not parse is given back as text, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import uuid

from mlxring.engine.detok import held


class ToolCalls:
    """One choice's text through the tool-call markers."""

    def __init__(self, tokenizer, tools: list[dict] | None):
        self.start = getattr(tokenizer, "tool_call_start", None)
        self.end = getattr(tokenizer, "tool_call_end", None)
        self.parse = getattr(tokenizer, "tool_parser", None)
        self.tools = tools
        self.on = bool(tools) and bool(self.start and self.end and self.parse)
        self.pending = ""  # text not yet given out: a possible marker start, or a call
        self.calls: list[dict] = []

    def feed(self, text: str) -> str:
        """The part of `text` (after what came before) that is plain reply text, now."""
        if not self.on:
            return text
        self.pending += text
        out = []
        while True:
            if self.pending.startswith(self.start):
                close = self.pending.find(self.end, len(self.start))
                if close < 0:
                    break  # inside a call: keep it until its end marker
                body = self.pending[len(self.start) : close]
                whole = self.pending[: close + len(self.end)]
                self.pending = self.pending[close + len(self.end) :]
                if not self._add(body):
                    out.append(whole)
                continue
            at = self.pending.find(self.start)
            if at < 0:
                keep = held(self.pending, (self.start,))
                cut = len(self.pending) - keep
                out.append(self.pending[:cut])
                self.pending = self.pending[cut:]
                break
            out.append(self.pending[:at])
            self.pending = self.pending[at:]
        return "".join(out)

    def finish(self) -> str:
        """Text still held at the end (an unfinished call is given back as text)."""
        rest, self.pending = self.pending, ""
        return rest

    def _add(self, body: str) -> bool:
        try:
            call = self.parse(body, self.tools)
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return False
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        self.calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": call["name"], "arguments": arguments},
            }
        )
        return True
