"""The HTTP routes: the page, OpenAI's chat completions and models, and knowledge-base search.

Every refusal is JSON in OpenAI's error shape (protocol.ApiError), also for an unknown route, a body
that is not JSON and a failure inside the server: the official client reads them as its own errors,
and the server goes on. Nothing in a request names a file: the page's three files are read once at
start, the checkpoint and knowledge base are the command line's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import traceback
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from hybridchat.serve.batcher import Batcher, Busy, Done, Job
from hybridchat.serve.config import ServeConfig
from hybridchat.serve.protocol import (
    ApiError,
    Completion,
    chat_request,
    document,
    extras,
    hop,
    read_json,
    search_request,
)

STATIC = Path(__file__).parent / "static"
PAGE = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
        "/app.css": ("app.css", "text/css")}
# The page runs only its own script: a document's text shown on it can never run as code.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def build_app(batcher: Batcher, config: ServeConfig, model_id: str) -> FastAPI:
    assistant = batcher.assistant
    has_kb = assistant.retriever is not None
    files = {route: ((STATIC / name).read_bytes(), kind) for route, (name, kind) in PAGE.items()}
    completion_time = Completion(model_id).created

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="hybridchat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse(ApiError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else
                                     "method_not_allowed").body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        traceback.print_exception(e, file=sys.stderr)
        return JSONResponse(ApiError(500, f"the server failed on this request ({type(e).__name__})", "server_error",
                                     kind="server_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "a valid API key is required: 'Authorization: Bearer <key>' (the server's api_key)",
                           "invalid_api_key", kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    async def body(request: Request) -> dict[str, Any]:
        """The JSON object sent, read no further than max_request_bytes."""
        limit, data = config.max_request_bytes, bytearray()
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request body is {int(length):,} bytes; at most {limit:,} are read", "too_large")
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise ApiError(413, f"the request body is over {limit:,} bytes", "too_large")
        return read_json(bytes(data))

    def page(route: str):
        async def serve_file() -> Response:
            content, kind = files[route]
            return Response(content, media_type=kind, headers=HEADERS)
        return serve_file

    for route in PAGE:
        app.get(route, include_in_schema=False)(page(route))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        # What the page needs to know of the model, beside OpenAI's fields.
        about = {"retrieval": has_kb, "top_k": assistant.settings.top_k if has_kb else None,
                 "max_hops": assistant.max_hops if has_kb else 1, "threshold": assistant.threshold,
                 "coverage_exponent": assistant.coverage_exponent if has_kb else 0.0,
                 "max_answer_tokens": assistant.max_answer_tokens, "context_tokens": assistant.max_context,
                 "reading": assistant.reading}
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": completion_time,
                                            "owned_by": "hybridchat", "hybridchat": about}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = chat_request(await body(request))
        if req.model != model_id:
            raise ApiError(404, f"the model '{req.model[:100]}' is not served here; this server serves '{model_id}'",
                           "model_not_found", "model")
        retrieval = has_kb if req.retrieval is None else req.retrieval
        if retrieval and not has_kb:
            raise ApiError(400, "this server has no knowledge base (it was started with retriever=none): "
                                "send retrieval=false", "no_knowledge_base", "retrieval")
        max_tokens = min(req.max_tokens or assistant.max_answer_tokens, assistant.max_answer_tokens)
        fits = (assistant.multihop(max_tokens) if retrieval else None) or assistant.answerer(max_tokens)
        if fits.fit_question(req.question) != req.question:
            raise ApiError(400, f"the question does not fit the model's {assistant.max_context}-token context "
                                f"(with room for its documents and a {max_tokens}-token reply): shorten it",
                           "context_length_exceeded", "messages")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def send(kind: str, payload: Any) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is closed: the server is stopping
                pass

        job = Job(req.question, retrieval, max_tokens, send)
        try:
            batcher.submit(job)
        except Busy:
            raise ApiError(503, f"the server is busy ({config.queue_size} requests wait already): retry shortly",
                           "server_busy", kind="server_error", headers={"Retry-After": "1"}) from None
        completion = Completion(model_id)
        if req.stream:
            return StreamingResponse(_stream(job, events, completion, assistant.threshold), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # Starlette cancels a streaming response whose client leaves, not a handler that awaits: watch
        # for the disconnect here, so the reply leaves the batch instead of being decoded to the end.
        watch = asyncio.ensure_future(_left(request, events))
        try:
            dropped = 0
            while True:
                kind, payload = await events.get()
                if kind == "gone":
                    return Response(status_code=499)  # nginx's "client closed request": nobody reads it
                if kind == "sources":
                    dropped = payload[1]
                elif kind == "error":
                    raise ApiError(500, payload, "model_error", kind="server_error")
                elif kind == "done":
                    done: Done = payload
                    return JSONResponse(completion.whole(done.answer.reply,
                                                         extras(done.answer, done.mode, assistant.threshold, dropped),
                                                         done.prompt_tokens, done.completion_tokens, done.finish_reason))
        finally:
            watch.cancel()
            job.cancelled = True

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        authorize(request)
        query, top_k = search_request(await body(request), assistant.settings.top_k, config.max_search_results)
        if not has_kb:
            raise ApiError(400, "this server has no knowledge base (it was started with retriever=none)",
                           "no_knowledge_base")
        hits = await run_in_threadpool(batcher.search, query, top_k)
        return {"query": query, "results": [{"rank": h.rank, "score": h.score, **document(h.document)} for h in hits]}

    return app


async def _left(request: Request, events: asyncio.Queue) -> None:
    """Puts ("gone", None) on the events once the client has closed its connection. The body is read
    already, so the server's next message is the disconnect (or, after the response, a no-op)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(("gone", None))


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(job: Job, events: asyncio.Queue, completion: Completion, threshold) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: a chunk with the role, the sources found (in the
    `hybridchat` field, before the reply begins; a multi-hop reply's `hop`s as its queries are
    answered, then the sources again), a chunk per piece of the reply, a last chunk with
    finish_reason, usage and the finished reply's `hybridchat` field, then [DONE]. A client that
    leaves cancels this generator: its job is marked so, and the worker goes on with the others."""
    try:
        yield _sse(completion.chunk({"role": "assistant", "content": ""}))
        dropped = 0
        while True:
            kind, payload = await events.get()
            if kind == "sources":
                shown, dropped = payload
                yield _sse(completion.chunk({}, hybridchat={"sources": [document(d, n) for n, d in enumerate(shown, 1)],
                                                            "dropped": dropped}))
            elif kind == "hop":
                yield _sse(completion.chunk({}, hybridchat={"hop": hop(*payload)}))
            elif kind == "delta":
                yield _sse(completion.chunk({"content": payload}))
            elif kind == "error":
                yield _sse(ApiError(500, payload, "model_error", kind="server_error").body())
                return
            elif kind == "done":
                usage = {"prompt_tokens": payload.prompt_tokens, "completion_tokens": payload.completion_tokens,
                         "total_tokens": payload.prompt_tokens + payload.completion_tokens}
                yield _sse(completion.chunk({}, payload.finish_reason, usage=usage,
                                            hybridchat=extras(payload.answer, payload.mode, threshold, dropped)))
                yield _sse("[DONE]")
                return
    finally:
        job.cancelled = True
