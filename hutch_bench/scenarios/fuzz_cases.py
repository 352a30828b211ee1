"""Hypothesis strategies for raw AMQP requests and cancels across the whole wire contract.

Each drawn :class:`~pipeline.testing.contract_oracle.Case` breaks the contract in zero or
more ways at once (a body of any OpenAI field with a wrong value, wrong or missing
properties, odd headers of every AMQP type and encoding, missing or duplicate correlation
ids, huge and empty bodies), and says what it broke, so the shared oracle can tell its
documented answer. Ids are not drawn: the rig replaces :data:`PLACEHOLDER` with a fresh
id of the same length when it publishes (shrinking then never changes an id).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from pipeline import protocol as p
from pipeline.testing.contract_oracle import Case

__all__ = ["BAD_FIELDS", "MODELS", "PLACEHOLDER", "Batch", "CancelShape", "Latin1", "WireShape",
           "batches", "bodies"]

#: Stands for the case's id in its body, correlation id and headers (same length as ids).
PLACEHOLDER = "#FUZZ-ID#"
MODELS = ("mock-small", "mock-large")
FUZZ_ID = "x-fuzz-id"


class Latin1(str):
    """A str that goes on the wire as an AMQP long string in Latin-1, not UTF-8, as
    clients in other languages can send (pamqp encodes with ``str.encode``)."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str(self).encode("latin-1")


@dataclass(frozen=True)
class WireShape:
    """What the generators need to know about the stack under test."""

    reply_queue: str  # the raw publisher's reply queue (answerable)
    ghost_reply_to: str  # a reply-queue name nobody declared
    forged_reply_tos: tuple[str, ...]  # queues a reply must never go to
    max_body_bytes: int


@dataclass(frozen=True)
class CancelShape:
    """One message to the cancel exchange. ``target``: index of the batch case whose
    correlation id it names (None: ``correlation_id`` as drawn). ``first``: published and
    registered before the batch (a tombstone the worker must honour); otherwise it races."""

    target: int | None
    correlation_id: str | None
    user_id: bool
    body: bytes
    reply_to: str | None
    headers: dict[str, Any]
    first: bool


@dataclass
class Batch:
    cases: list[Case]
    #: Per case: index of the case whose correlation id it shares (a duplicate), or None.
    duplicates: list[int | None]
    cancels: list[CancelShape] = field(default_factory=list)
    valid_alongside: int = 0


_PICKS: dict[Any, st.SearchStrategy[Any]] = {}


def _pick(key: Any, values: Any) -> st.SearchStrategy[Any]:
    """``st.sampled_from(values)``, built once per ``key``: a strategy built inside a draw
    is validated again on every draw, which made generation ten times slower."""
    if key not in _PICKS:
        _PICKS[key] = st.sampled_from(list(values))
    return _PICKS[key]


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)

#: Well-typed optional fields a backend accepts.
_GOOD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(8, 500),  # the mock cuts its echo at max_tokens words
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "seed": st.integers(-(2**31), 2**31),
    "presence_penalty": st.floats(-2, 2),
    "user": _TEXT,
    "stop": st.one_of(_TEXT.filter(bool), st.lists(_TEXT, max_size=4)),
    "stream": st.just(None) | st.just(False),
    "x-unknown-field": st.none() | st.integers() | _TEXT,  # passed through as written
}

#: Values OpenAI's schema refuses for each typed field (the worker checks before calling).
BAD_FIELDS: dict[str, list[Any]] = {
    "max_tokens": ["ten", "10", 0, -3, 1.5, [], {}, True],
    "max_completion_tokens": [0, "x", 2.5],
    "temperature": ["hot", "1", -0.5, 2.01, 1e9, [], {}, True],
    "top_p": [1.5, -0.1, "x"],
    "n": [0, 129, 1.5, "2"],
    "stop": [5, [1], ["a", "b", "c", "d", "e"], {}],
    "seed": ["1", 1.5, []],
    "presence_penalty": [3, -2.5, "x"],
    "frequency_penalty": [2.1, "0"],
    "logprobs": ["true", 1],
    "top_logprobs": [21, -1, "1"],
    "logit_bias": ["x", {"1": "a"}, []],
    "user": [5, []],
    "response_format": ["json", 5, []],
    "tools": [{}, "x", [1]],
    "tool_choice": [5, []],
    "parallel_tool_calls": ["yes", 1],
    "stream": ["true", 1, "yes", [True]],
    "stream_options": ["x", {"include_usage": "yes"}, 5],
    "model": [5, None, "", "m" * 300, ["mock-small"], {}],
    "messages": ["hi", {}, 5, None, [], {"role": "user"}],
}
_BAD_MESSAGES: list[Any] = [
    {"content": "no role"}, {"role": "", "content": "empty role"},
    {"role": 5, "content": "numeric role"}, {"role": None}, {"role": "user", "content": 5},
    {"role": "user", "content": {"text": "an object"}}, {"role": "user", "content": True},
    "just a string", ["a", "list"],
]


_MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": _TEXT}), max_size=2)
_OPTIONAL = st.fixed_dictionaries({}, optional=_GOOD_FIELDS)


@st.composite
def _valid_body(draw: st.DrawFn) -> dict[str, Any]:
    messages = draw(_MESSAGES)
    body: dict[str, Any] = {"model": draw(_pick("model", MODELS)),
                            "messages": [*messages,
                                         {"role": "user", "content": f"fuzz {PLACEHOLDER}"}]}
    if draw(st.booleans()):
        body.update(draw(_OPTIONAL))
    return body


def _set(body: dict[str, Any], key: str, value: Any) -> bytes:
    return _compact({**body, key: value})


def _random_bytes(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    return b"\xff" + draw(st.binary(max_size=200))  # 0xff never starts JSON nor is UTF-8


def _invalid_utf8(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    bad = draw(_pick(1, [b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80", b"\xc0\xaf",
                                b"\xf8\x88\x80\x80\x80", b"\xe2\x28\xa1", b"\xff"]))
    return _compact(body).replace(b"fuzz ", b"fuzz " + bad, 1)


def _truncated(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    raw = _compact(body)
    return raw[:draw(st.integers(0, len(raw) - 1))]


def _deep(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    depth = draw(st.integers(300, 5_000))  # past the parser's nesting limit
    return b'{"model":"mock-small","messages":' + b"[" * depth + b"]" * depth + b"}"


def _missing_field(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    missing = draw(_pick(2, ["model", "messages"]))
    return _compact({k: v for k, v in body.items() if k != missing})


def _bad_field(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    name = draw(_pick(3, sorted(BAD_FIELDS)))
    return _set(body, name, draw(_pick((4, name), BAD_FIELDS[name])))


def _bad_message(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    return _set(body, "messages", [*body["messages"][:-1], draw(_pick(5, _BAD_MESSAGES))])


def _backend_rejects(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    content = draw(_pick(6, [[1, 2], ["text"], [{"type": "text", "text": 5}]]))
    return _set(body, "messages", [*body["messages"][:-1], {"role": "user", "content": content}])


def _constant(strategy: st.SearchStrategy[Any], key: str | None = None) -> Any:
    def mutate(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
        value = draw(strategy)
        return _compact(value) if key is None else _set(body, key, value)
    return mutate


#: Body defects: (body class, how to make the body from a valid one).
_BODY_DEFECTS: dict[str, tuple[str, Any]] = {
    "random_bytes": ("invalid_json", _random_bytes),
    "invalid_utf8": ("invalid_json", _invalid_utf8),
    "truncated": ("invalid_json", _truncated),
    "empty": ("invalid_json", lambda draw, body: draw(_pick(7, [b"", b" ", b"\n"]))),
    "utf16": ("invalid_json", lambda draw, body: json.dumps(body).encode("utf-16")),
    "bom": ("invalid_json", lambda draw, body: b"\xef\xbb\xbf" + _compact(body)),
    "deep": ("invalid_json", _deep),
    "not_an_object": ("invalid_request", _constant(st.sampled_from(
        [[1, 2], [], 42, -1.5, "mock-small", None, True, [{"model": "mock-small"}]]))),
    "missing_field": ("invalid_request", _missing_field),
    "bad_field": ("invalid_request", _bad_field),
    "bad_message": ("invalid_request", _bad_message),
    "other_pool_model": ("invalid_request", _constant(st.sampled_from(
        ["gpt-4o", "mock-small ", "MOCK-SMALL", "llama"]), "model")),
    # Valid for Hutch (content is a list of anything), refused by the backend (400).
    "backend_rejects": ("backend_rejects", _backend_rejects),
}


@st.composite
def bodies(draw: st.DrawFn, shape: WireShape) -> tuple[bytes, str, bool, str]:
    """A request body: (body, body class, too large, what is wrong with it)."""
    body = draw(_valid_body())
    kind = draw(_pick(8, ["valid"] * 3 + ["oversized", *_BODY_DEFECTS]))
    if kind == "valid":
        return _compact(body), "valid", False, kind
    if kind == "oversized":  # valid JSON over the limit
        size = draw(st.integers(shape.max_body_bytes + 1, 2 * shape.max_body_bytes))
        return _set(body, "messages", [*body["messages"][:-1],
                                       {"role": "user", "content": "x" * size}]), \
            "valid", True, kind
    body_class, make = _BODY_DEFECTS[kind]
    return make(draw, body), body_class, False, kind


_HEADER_SCALARS: st.SearchStrategy[Any] = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.integers(-100, 100),
    st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans(), st.none(),
    st.text(max_size=40), st.binary(max_size=20).map(bytearray),
    st.integers(-(10**6), 10**6).map(lambda n: Decimal(n) / Decimal(100)),
    st.integers(0, 2**31).map(lambda s: datetime.datetime.fromtimestamp(s, datetime.UTC)),
    st.text(st.characters(codec="latin-1"), max_size=10).map(Latin1),
)
_HEADER_VALUES = st.recursive(
    _HEADER_SCALARS, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3), max_leaves=6)


_ODD_HEADERS = st.dictionaries(
    st.sampled_from(["x-fuzz-odd", "x-fuzz-ключ", "🐇", "x-fuzz-" + "k" * 100]),
    _HEADER_VALUES, max_size=3)
_CANCEL_HEADERS = st.dictionaries(st.sampled_from(["x-fuzz-odd", p.H_DEADLINE]),
                                  _HEADER_VALUES, max_size=2)


@st.composite
def _headers(draw: st.DrawFn, shape: WireShape) -> tuple[dict[str, Any], bool, str | None]:
    """(headers, deadline passed, endpoint defect or None)."""
    # Odd headers on one request in four (they are the costliest part to draw).
    headers: dict[str, Any] = draw(_ODD_HEADERS) if draw(st.integers(0, 3)) == 0 else {}
    deadline = draw(_pick(9, ["absent", "past", "future", "garbage"]))
    now = p.now_ms()
    past = False
    if deadline == "past":
        ago = now - draw(st.integers(1_000, 10**9))
        # pamqp sends a float as 32 bits: up to ~65 s off at today's epoch ms, so a float
        # deadline is set well in the past (a second ago could arrive as a minute ahead).
        headers[p.H_DEADLINE] = [ago, str(ago), float(ago - 600_000), 0, -1][
            draw(_pick(10, range(5)))]
        past = True
    elif deadline == "future":
        headers[p.H_DEADLINE] = [now + 60_000, str(now + 60_000), 2**63 - 1][
            draw(_pick(11, range(3)))]
    elif deadline == "garbage":  # not a number: ignored, as if absent
        headers[p.H_DEADLINE] = draw(_pick(12,
            ["soon", True, False, None, [1, 2], {"at": 1}, bytearray(b"\xff"), ""]))
    if draw(st.booleans()):
        headers[p.H_SENT_AT] = [now + 10**6, 0, -5, "yesterday", -(2**63), now - 3_600_000][
            draw(_pick(13, range(6)))]
    if draw(st.booleans()):
        headers[p.H_ATTEMPTS] = draw(_pick(14, [1, 5, "x", 10**6, 2**63 - 1, str(2**64), -50]))
    if draw(st.integers(0, 19)) == 0:  # big headers (the frame limit is 128 KiB)
        headers["x-fuzz-big"] = draw(_pick(28, ["h" * 1_000, "ü" * 10_000, "h" * 60_000]))
    if draw(st.integers(0, 9)) == 0:
        headers["x-death"] = [{
            "reason": draw(_pick(15, ["maxlen", "expired", "rejected", 5])),
            "queue": shape.forged_reply_tos[0], "count": 1,
            "routing-keys": [draw(_pick(16, MODELS))]}]
    endpoint = draw(_pick(17,
        [None, None, None, "chat.completions", "bad", "", "chat", 5, True]))
    bad_endpoint = None
    if endpoint is not None:
        headers[p.H_ENDPOINT] = endpoint
        if endpoint != "chat.completions":
            bad_endpoint = f"endpoint:{endpoint!r}"
    headers[FUZZ_ID] = PLACEHOLDER
    return headers, past, bad_endpoint


@st.composite
def _case(draw: st.DrawFn, shape: WireShape) -> Case:
    body, body_class, too_large, body_kind = draw(bodies(shape))
    headers, past, bad_endpoint = draw(_headers(shape))
    reply_kind = draw(_pick(18, ["ok"] * 5 + ["missing", "forged", "ghost"]))
    reply_to = {"ok": shape.reply_queue, "ghost": shape.ghost_reply_to,
                "missing": draw(_pick(19, [None, ""])),
                "forged": draw(_pick((20, shape), shape.forged_reply_tos))}[reply_kind]
    content_type = draw(_pick(21,
        ["application/json"] * 4 + [None, "", "APPLICATION/JSON",
                                    "application/json; charset=utf-8", "text/plain",
                                    "application/xml", "json", "text/json; charset=utf-8"]))
    bad_ct = content_type not in (None, "") and content_type.split(";")[0].lower() != (
        "application/json")
    cid = draw(_pick(22, [PLACEHOLDER] * 8 + [None, ""]))
    unknown = draw(st.integers(0, 9)) == 0
    routing_key = (draw(_pick(23, ["gpt-17", "", "mock-small ", "MOCK-SMALL", "mock-*",
                                         "#", "modèle-🐇", "m" * 255]))
                   if unknown else draw(_pick(24, MODELS)))
    defects = [body_kind, f"reply_to:{reply_kind}", f"content_type:{content_type!r}",
               f"correlation_id:{cid!r}", f"routing_key:{routing_key!r}"]
    if past:
        defects.append("deadline:past")
    if bad_endpoint:
        defects.append(bad_endpoint)
    return Case(fuzz_id=PLACEHOLDER, body=body, routing_key=routing_key, correlation_id=cid,
                reply_to=reply_to, content_type=content_type,
                priority=draw(st.integers(0, 255)), headers=headers, defects=defects,
                unroutable=unknown, reply_to_kind=reply_kind, too_large=too_large,
                bad_content_type=bad_ct, bad_endpoint=bad_endpoint is not None,
                body_class=body_class, deadline_past=past)


@st.composite
def _cancel(draw: st.DrawFn, shape: WireShape, n_cases: int) -> CancelShape:
    target = draw(st.none() | st.integers(0, n_cases - 1))
    return CancelShape(
        target=target,
        correlation_id=None if target is not None else draw(_pick(25,
            [None, "", "never-sent", PLACEHOLDER + "-other", "x" * 255])),
        user_id=draw(st.booleans()) if target is not None else True,
        body=draw(_pick(26, [b"", b"{}", b"\xff\xfe", b"x" * 1000])),
        reply_to=draw(_pick((27, shape), [None, None, shape.reply_queue,
                                       *shape.forged_reply_tos])),
        headers=draw(_CANCEL_HEADERS),
        first=draw(st.booleans()))


@st.composite
def _batch(draw: st.DrawFn, shape: WireShape, min_cases: int, max_cases: int) -> Batch:
    cases = draw(st.lists(_case(shape), min_size=min_cases, max_size=max_cases))
    duplicates = [draw(st.none() | st.integers(0, len(cases) - 1))
                  if draw(st.integers(0, 9)) == 0 else None for _ in cases]
    cancels = draw(st.lists(_cancel(shape, len(cases)), max_size=max(1, len(cases) // 4)))
    return Batch(cases, duplicates, cancels, draw(st.integers(0, 3)))


def batches(shape: WireShape, max_cases: int = 40, min_cases: int = 1
            ) -> st.SearchStrategy[Batch]:
    """Batches of raw requests and cancels, with valid requests sent alongside."""
    return _batch(shape, min_cases, max_cases)
