"""Rebuilding one streamed answer from its messages, as the wire contract says.

Pure bookkeeping, no I/O: :class:`Assembly` is fed a request's reply messages in the order
they arrived and hands out the ``chat.completion.chunk`` objects to show, once each, in
order, from one attempt only:

- chunk messages are numbered per stream id (``x-hutch-seq``): a repeated number is
  dropped, a later one is held until the gap before it is filled (it may never be: a
  transient chunk lost in a broker restart; then the final message fills it);
- the final message is trusted: whatever of its answer was not shown yet (missed chunks,
  chunks dropped because the reader fell behind) comes out as one last chunk;
- a chunk (or final) of another stream id after chunks of the followed one were shown is a
  restarted attempt (a worker died mid-stream): :class:`StreamInterruptedError` with
  ``restarted=True``, and from then on the new attempt is followed from its start. Two
  attempts are never spliced into one answer.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

from pydantic import ValidationError

from pipeline import protocol as p
from pipeline.client.replies import (
    ReplyMessage,
    completion_of,
    header_int,
    header_str,
    is_chunk,
)
from pipeline.errors import RequestFailed, StreamInterruptedError
from pipeline.models import (
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
)
from pipeline.observe.log import get_logger

__all__ = ["Assembly"]

log = get_logger("hutch.client")


@dataclass
class _Shown:
    """What the caller was shown of one choice of the followed attempt."""

    role: bool = False
    content: str = ""
    finished: bool = False


class Assembly:
    """One streaming request: messages in, chunks to show out, then one ending."""

    def __init__(self, *, max_held: int = 1000) -> None:
        #: The stream id (attempt) followed; None until its first message.
        self.stream_id: str | None = None
        self._abandoned: set[str] = set()
        self._max_held = max_held
        self._next_seq = 0
        self._held: dict[int, list[ChatCompletionChunk]] = {}
        self._out: deque[ChatCompletionChunk] = deque()
        self._shown: dict[int, _Shown] = {}
        self._usage_shown = False
        #: Chunk messages of the followed attempt released to be shown.
        self._released = 0
        #: The final answer (once its final message arrived), or its error.
        self.completion: ChatCompletion | None = None
        self.error: RequestFailed | None = None
        #: Chunk messages dropped: repeats, stale attempts, unreadable or held too many.
        self.dropped = 0

    @property
    def done(self) -> bool:
        """The final message arrived (there may still be chunks to take)."""
        return self.completion is not None or self.error is not None

    @property
    def shown_any(self) -> bool:
        return bool(self._shown) or self._usage_shown

    def take(self) -> ChatCompletionChunk | None:
        """The next chunk to show (now counted as shown), None if none is ready."""
        if not self._out:
            return None
        chunk = self._out.popleft()
        for choice in chunk.choices:
            shown = self._shown.setdefault(choice.index, _Shown())
            shown.role = shown.role or choice.delta.role is not None
            shown.content += choice.delta.content or ""
            shown.finished = shown.finished or choice.finish_reason is not None
        self._usage_shown = self._usage_shown or chunk.usage is not None
        return chunk

    def feed(self, message: ReplyMessage) -> None:
        """Take one message of the request. Raises :class:`StreamInterruptedError`
        (``restarted``) when it starts a new attempt after chunks of another were shown;
        the new attempt is followed from then on."""
        if self.done:
            self.dropped += int(is_chunk(message))
            return
        stream_id = header_str(message, p.H_STREAM_ID)
        if is_chunk(message):
            self._chunk(message, stream_id)
        else:
            self._final(message, stream_id)

    # -- chunks ----------------------------------------------------------------------

    def _chunk(self, message: ReplyMessage, stream_id: str | None) -> None:
        seq = header_int(message, p.H_SEQ)
        if stream_id is None or seq is None or stream_id in self._abandoned:
            self.dropped += 1
            return
        restart = None
        if stream_id != self.stream_id:
            restart = self._restart(stream_id)
        if seq < self._next_seq or seq in self._held or len(self._held) >= self._max_held:
            self.dropped += 1
        else:
            self._held[seq] = self._parse(message)
            while self._next_seq in self._held:
                self._out.extend(self._held.pop(self._next_seq))
                self._next_seq += 1
                self._released += 1
        if restart is not None:
            raise restart

    def _parse(self, message: ReplyMessage) -> list[ChatCompletionChunk]:
        try:
            events = json.loads(message.body)
            if not isinstance(events, list):
                raise ValueError("a chunk message's body is a JSON array")
            return [ChatCompletionChunk.model_validate(event) for event in events]
        except (ValueError, ValidationError) as exc:
            # Shown as a gap: the final message fills it.
            log.warning("stream.chunk_unreadable", correlation_id=message.correlation_id,
                        error=str(exc)[:200])
            return []

    def _restart(self, stream_id: str | None) -> StreamInterruptedError | None:
        """Follow another attempt from its start; the restart error to raise if chunks
        of the one followed so far were shown (None: nothing shown, a silent switch)."""
        restart = None
        if self.shown_any:
            chars = sum(len(s.content) for s in self._shown.values())
            restart = StreamInterruptedError(
                f"the stream restarted (a new attempt, {stream_id}) after {chars} "
                "characters of another were shown: discard them, the answer starts over",
                code=str(p.ErrorCode.STREAM_INTERRUPTED), type="api_error",
                chunks_sent=self._released, content_chars_sent=chars, restarted=True)
        if self.stream_id is not None:
            self._abandoned.add(self.stream_id)
        self.stream_id = stream_id
        self._next_seq = 0
        self._released = 0
        self._held.clear()
        self._out.clear()
        self._shown.clear()
        self._usage_shown = False
        return restart

    # -- the final message -----------------------------------------------------------

    def _final(self, message: ReplyMessage, stream_id: str | None) -> None:
        try:
            completion = completion_of(message)
        except RequestFailed as exc:
            self.error = exc
            self._out.clear()  # nothing after a gap can be shown; the error ends it
            return
        restart = None
        if stream_id != self.stream_id or not self._extends_shown(completion):
            restart = self._restart(stream_id)
        self._out.clear()  # the rest comes from the final message, in one piece
        self._held.clear()
        self.completion = completion
        rest = self._rest(completion)
        if rest is not None:
            self._out.append(rest)
        if restart is not None:
            raise restart

    def _extends_shown(self, completion: ChatCompletion) -> bool:
        """Whether what was shown is the start of this answer (a sanity check)."""
        contents = {c.index: c.message.content for c in completion.choices}
        for index, shown in self._shown.items():
            content = contents.get(index)
            if shown.content and not (isinstance(content, str)
                                      and content.startswith(shown.content)):
                return False
        return True

    def _rest(self, completion: ChatCompletion) -> ChatCompletionChunk | None:
        """One chunk with what the caller has not been shown of the final answer."""
        choices = []
        for choice in completion.choices:
            shown = self._shown.get(choice.index, _Shown())
            content = choice.message.content if isinstance(choice.message.content, str) else ""
            rest = content[len(shown.content):]
            finish = None if shown.finished else choice.finish_reason
            role = None if shown.role else choice.message.role
            if rest or finish is not None or role is not None:
                choices.append(ChunkChoice(index=choice.index, finish_reason=finish,
                                           delta=ChunkDelta(role=role, content=rest or None)))
        usage = None if self._usage_shown else completion.usage
        if not choices and usage is None:
            return None
        return ChatCompletionChunk(id=completion.id, created=completion.created,
                                   model=completion.model, choices=choices, usage=usage)
