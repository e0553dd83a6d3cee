"""Requests read and checked, responses shaped as OpenAI's chat completions (and the extras).

Only what the model does is accepted: greedy replies (temperature and top_p are read and ignored),
one choice, the last user message as the question (earlier turns are not read: each question is
answered on its own, as in chat). What a chat-completions response cannot say travels in one extra
field, `hybridchat`: the sources shown, the citation, the confidence, the abstention and the hops.
Every refusal is an ApiError: a status and OpenAI's error object {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from hybridchat.core.documents import Document
from hybridchat.rag.answer import Answer
from hybridchat.rag.multihop import Hop


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    model: str
    question: str
    stream: bool
    retrieval: bool | None   # None: the server's default (retrieval where it has a knowledge base)
    max_tokens: int | None


def read_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return value


def _field(body: dict, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:  # OpenAI's optional parameters are nullable: null is the default, as left out
        return default
    # bool is an int in Python: a count given as true is a mistake, not 1
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", "invalid_type", name)
    return value


def _text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if parts and all(isinstance(t, str) for t in parts):
            return " ".join(parts)
    return None


def chat_request(body: dict[str, Any]) -> ChatRequest:
    model = _field(body, "model", (str,), "a string (GET /v1/models lists it)")
    if model is None:
        raise ApiError(400, "'model' is required (GET /v1/models lists it)", "missing_required_parameter", "model")
    messages = _field(body, "messages", (list,), "a list of messages")
    if not messages:
        raise ApiError(400, "'messages' must hold at least one message", "missing_required_parameter", "messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ApiError(400, "'messages' holds no message with role 'user': the question is the last one",
                       "invalid_value", "messages")
    question = _text(users[-1].get("content"))
    if question is None or not question.strip():
        raise ApiError(400, "the last user message has no text", "invalid_value", "messages")
    if "\x00" in question:
        raise ApiError(400, "the question holds a NUL character", "invalid_value", "messages")
    n = _field(body, "n", (int,), "1 (one choice per request)", 1)
    if n != 1:
        raise ApiError(400, f"'n' must be 1 (greedy replies: every choice would be the same), got {n}",
                       "invalid_value", "n")
    max_tokens = _field(body, "max_completion_tokens", (int,), "a positive integer",
                        _field(body, "max_tokens", (int,), "a positive integer"))
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be >= 1, got {max_tokens}", "invalid_value", "max_tokens")
    stream = _field(body, "stream", (bool,), "true or false", False)
    retrieval = _field(body, "retrieval", (bool,), "true (answer from the knowledge base) or false (closed-book)")
    return ChatRequest(model, question, stream, retrieval, max_tokens)


def search_request(body: dict[str, Any], default_k: int, max_k: int) -> tuple[str, int]:
    query = _field(body, "query", (str,), "a string")
    if query is None or not query.strip():
        raise ApiError(400, "'query' must be a non-empty string", "invalid_value", "query")
    top_k = _field(body, "top_k", (int,), "a positive integer", default_k)
    if not 1 <= top_k <= max_k:
        raise ApiError(400, f"'top_k' must be in 1..{max_k}, got {top_k}", "invalid_value", "top_k")
    return query, top_k


def document(d: Document, number: int | None = None) -> dict[str, Any]:
    shown = {"id": d.id, "title": d.title, "text": d.text}
    return shown if number is None else {"n": number, **shown}


def _number(x: float | None) -> float | None:
    # JSON has no NaN: damaged weights give a confidence that is not a number, said as null
    return x if x is not None and math.isfinite(x) else None


def hop(h: Hop, shown: Sequence[Document]) -> dict[str, Any]:
    """One hop of a multi-hop reply: its query (hop 1's: the question), whether it was followed
    (rag/multihop.py's statuses) and the numbers its documents have among the sources `shown`."""
    numbers = {d.id: n for n, d in enumerate(shown, 1)}
    return {"query": h.query, "status": h.status, "documents": [numbers[d.id] for d in h.documents]}


def extras(answer: Answer, mode: str, threshold: float | None, dropped: int = 0) -> dict[str, Any]:
    """The `hybridchat` field of a finished reply."""
    hops = [hop(h, answer.documents) for h in answer.hops]
    return {"mode": mode, "sources": [document(d, n) for n, d in enumerate(answer.documents, 1)],
            "dropped": dropped, "answer": answer.answer, "citations": answer.citations,
            "cited": [d.id for d in answer.cited], "abstained": answer.abstained,
            "confidence": _number(answer.confidence), "threshold": threshold,
            "below_threshold": answer.below_threshold, "over_abstention": answer.over_abstention, "hops": hops,
            # reading=rank_order: the source the answer was read from (null: none sufficed), each one's confidence alone
            **({"read": answer.read, "read_confidences": [_number(c) for c in answer.read_confidences]}
               if answer.read_confidences is not None else {})}


class Completion:
    """One request's response ids and shapes: the whole reply, or its stream's chunks."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, reply: str, extra: dict[str, Any], prompt_tokens: int, completion_tokens: int,
              finish_reason: str) -> dict[str, Any]:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": finish_reason, "logprobs": None}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                "hybridchat": extra}

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **more: Any) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **more}
