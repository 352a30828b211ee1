"""Assembling a streamed answer into the one ``chat.completion`` of its final message.

The final message of a stream carries the whole answer, so a client that missed chunk
messages (a broker restart, a gap) still ends with the exact text and usage. This module
folds ``chat.completion.chunk`` objects, in order, into that completion: per choice the
role, the concatenated ``content`` (and ``refusal``), the ``tool_calls`` merged by index
(their ``arguments`` concatenated), the ``finish_reason``; the stream's ``usage`` if the
backend sent one. Every other top-level field of the first chunk is kept.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Assembler"]

_CHUNK_ONLY = ("object", "choices", "usage")


def _merge_tool_calls(into: list[dict[str, Any]], deltas: list[Any]) -> None:
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index", len(into))
        while len(into) <= index:
            into.append({"id": None, "type": "function",
                         "function": {"name": "", "arguments": ""}})
        call = into[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function")
        if isinstance(function, dict):
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    call["function"][key] += function[key]


class _Choice:
    """One choice being assembled."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.role = "assistant"
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.finish_reason: str | None = None

    def add(self, choice: dict[str, Any]) -> int:
        """Fold one chunk's choice in; returns how many content characters it added."""
        delta = choice.get("delta")
        added = 0
        if isinstance(delta, dict):
            if isinstance(delta.get("role"), str):
                self.role = delta["role"]
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
                added = len(delta["content"])
            if isinstance(delta.get("refusal"), str):
                self.refusal.append(delta["refusal"])
            if isinstance(delta.get("tool_calls"), list):
                _merge_tool_calls(self.tool_calls, delta["tool_calls"])
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        return added

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": "".join(self.content)}
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
            if not self.content:
                message["content"] = None
        return {"index": self.index, "message": message, "finish_reason": self.finish_reason}


class Assembler:
    """Folds a stream's chunks, in order, into its completion."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: dict[str, Any] | None = None
        #: Characters of ``content`` seen so far (what a client has been sent).
        self.content_chars = 0
        self.chunks = 0
        self._output_parts = 0  # chunks with tool calls or a refusal

    def add(self, chunk: dict[str, Any]) -> bool:
        """Fold one chunk in; True if it carried generated output (content, a refusal or
        a tool call), not only a role or a finish reason."""
        self.chunks += 1
        before = (self.content_chars, self._output_parts)
        if self.chunks == 1:
            self._head = {k: v for k, v in chunk.items() if k not in _CHUNK_ONLY}
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            index = index if isinstance(index, int) else 0
            assembled = self._choices.setdefault(index, _Choice(index))
            self.content_chars += assembled.add(choice)
            delta = choice.get("delta")
            if isinstance(delta, dict) and (delta.get("tool_calls") or delta.get("refusal")):
                self._output_parts += 1
        return (self.content_chars, self._output_parts) != before

    @property
    def started(self) -> bool:
        """Whether any chunk was added."""
        return self.chunks > 0

    @property
    def finished(self) -> bool:
        """Every choice has its ``finish_reason``: the answer is complete."""
        return bool(self._choices) and all(
            c.finish_reason is not None for c in self._choices.values())

    def completion(self) -> dict[str, Any]:
        """The ``chat.completion`` object the chunks so far make up."""
        completion: dict[str, Any] = {"id": "", "created": 0, "model": "", **self._head,
                                      "object": "chat.completion"}
        completion["choices"] = [self._choices[i].message() for i in sorted(self._choices)]
        if self._usage is not None:
            completion["usage"] = self._usage
        return completion
