"""`swarm api`: an OpenAI-compatible HTTP API (and the swarm's web page) over a persistent swarm client.

The stack: Starlette on uvicorn (with uvloop where installed). Starlette is a small, well-kept ASGI
toolkit (routing, streaming responses, static files, lifespan) with no model layer to fight, and
uvicorn is the server most ASGI apps run on; FastAPI would add request models we validate
ourselves anyway (to name the bad field in OpenAI's error shape). No HTTP is written by hand.

Routes: ``GET /`` (the web page, ``api/static/index.html``), ``/static/*``, ``GET /v1/swarm``
(``swarm status --json``'s object), ``GET /v1/models``, ``POST /v1/completions``, ``POST
/v1/chat/completions`` (``stream: true``: server-sent events in OpenAI's chunk format, ending
with ``data: [DONE]``). Errors have OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``. How requests are read: :mod:`swarm.api.requests`; how they run:
:mod:`swarm.api.backend`.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import time
import uuid
from pathlib import Path

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from swarm.api.backend import ApiConfig, Backend, Choices, Event, with_max_tokens
from swarm.api.logprobs import Logprobs
from swarm.api.requests import ApiError, parse_json, parse_messages, parse_prompt, parse_sampling
from swarm.engine.context import check_prompt_length

log = logging.getLogger("swarm.api")

STATIC = Path(__file__).parent / "static"
MAX_BODY = 2 * 2**20  # bytes of one request body (an 8,192-token context is ~40 KB of text)
BODY_TIMEOUT = 30.0  # s for a request's body to arrive (a client trickling bytes holds nothing longer)
WAIT_TIMEOUT = 60.0  # s a request may wait for a free generation slot
MAX_WAITING = 64  # requests waiting for a slot at once; more are refused (429)
MAX_CONNECTIONS = 512  # connections and requests at once (uvicorn answers 503 beyond)
STATUS_TTL = 1.0  # s a /v1/swarm report is reused (every open page polls it; each report pings every server)
PLACEHOLDER = ("<!doctype html><title>swarm api</title><p>swarm api is running: the OpenAI-compatible API is at "
               "<code>/v1</code> (<a href='/v1/models'>models</a>, <a href='/v1/swarm'>swarm</a>).</p>")


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(backend: Backend) -> Starlette:
    """The ASGI app over a started :class:`Backend` (whoever started it closes it)."""
    slots = anyio.Semaphore(backend.cfg.max_requests)  # generations at once (a request of n choices takes n)
    taking = anyio.Lock()
    waiting = [0]  # requests waiting for a slot now
    report: dict = {"at": -STATUS_TTL, "value": None, "lock": anyio.Lock()}

    def check_key(request: Request) -> None:
        key = backend.cfg.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            what = "wrong" if given else "missing"
            raise ApiError(401, f"{what} API key: send the key given to `swarm api --api-key` as "
                                "'Authorization: Bearer KEY'", code="invalid_api_key")

    def endpoint(handler):
        async def wrapped(request: Request) -> Response:
            try:
                check_key(request)
                return await handler(request)
            except ApiError as exc:
                return error_response(exc)
            except Exception as exc:  # one line to the caller; the server keeps serving
                log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

        return wrapped

    async def index(request: Request) -> Response:
        page = STATIC / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(PLACEHOLDER)

    async def swarm_status(request: Request) -> Response:
        async with report["lock"]:  # one report at a time, reused for STATUS_TTL
            if time.monotonic() - report["at"] >= STATUS_TTL:
                report["value"] = await backend.status()
                report["at"] = time.monotonic()
            return JSONResponse(report["value"])

    async def models(request: Request) -> Response:
        created = int(backend.started)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "swarm",
             "root": backend.name, "parent": None if adapter is None else backend.name}
            for name, adapter in backend.models.items()
        ]})

    async def completions(request: Request) -> Response:
        return await run(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await run(request, chat=True)

    async def run(request: Request, chat: bool) -> Response:
        body = parse_json(await read_body(request))
        name = body.get("model") or backend.name
        if not isinstance(name, str):
            raise ApiError(400, "model must be a string (a name from /v1/models)", "model", "invalid_value")
        if name not in backend.models:
            raise ApiError(404, f"the model {json.dumps(name)[:80]} is not served here; served: "
                                f"{', '.join(backend.models)}", "model", "model_not_found")
        adapter = backend.models[name]
        cm = backend.client_model
        sampling = parse_sampling(body, cm.eos_token_ids, chat, backend.cfg.draft)
        if chat:
            param, messages = "messages", parse_messages(body.get("messages"))
            try:
                prompt_ids = await anyio.to_thread.run_sync(backend.encode_chat, messages)
            except Exception as exc:  # no template, or a conversation the template refuses (jinja2's errors)
                raise ApiError(400, f"messages: the chat template refused them: {exc}", "messages") from None
        else:
            param, prompt = "prompt", parse_prompt(body.get("prompt"), cm.checkpoint.config.vocab_size)
            prompt_ids = await anyio.to_thread.run_sync(backend.encode, prompt) if isinstance(prompt, str) else prompt
        if not prompt_ids:
            raise ApiError(400, f"{param}: the prompt has no tokens", param)
        try:
            check_prompt_length(len(prompt_ids), cm.head.max_positions, adapter.num_virtual_tokens if adapter else 0)
        except ValueError as exc:
            raise ApiError(400, str(exc), param, "context_length_exceeded") from None
        gen = with_max_tokens(sampling.gen, sampling.max_tokens or backend.cfg.default_max_tokens)
        n = sampling.n
        if n > backend.cfg.max_requests:
            raise ApiError(400, f"n is {n}, more than the {backend.cfg.max_requests} generations this API runs at once "
                                "(swarm api --max-requests)", "n", "invalid_value")
        prompt_text = None  # completions' echo and log-probability offsets (which count from the prompt's start)
        if not chat and (sampling.echo or sampling.logprobs is not None):
            prompt_text = prompt if isinstance(prompt, str) else await anyio.to_thread.run_sync(backend.decode, prompt_ids)
        reply = Reply(chat, name, prompt_ids, sampling, backend.decode, prompt_text)

        if waiting[0] >= MAX_WAITING and slots.value < n:
            raise ApiError(429, f"{MAX_WAITING} requests are waiting already; try again shortly", code="busy")
        got, left = [], False

        async def take() -> bool:
            async with taking:  # one request gathers its n slots at a time: no two hold part of theirs
                for _ in range(n):
                    await slots.acquire()
                    got.append(True)  # no checkpoint between: a slot taken is always known here
            return True

        waiting[0] += 1
        try:
            with anyio.move_on_after(WAIT_TIMEOUT):
                left = await until_disconnect(request, take()) is None
        finally:
            waiting[0] -= 1
        if left or len(got) < n:
            for _ in got:
                slots.release()
            if left:
                return Response(status_code=499)  # the client left while waiting
            raise ApiError(429, f"no generation slot was free within {WAIT_TIMEOUT:.0f} s (--max-requests "
                                f"{backend.cfg.max_requests}); try again shortly", code="busy")
        choices = Choices(backend, prompt_ids, gen, sampling.stop, adapter, n, sampling.logprobs, sampling.echo,
                          score_only=sampling.max_tokens == 0)
        handed_over = False

        def done() -> None:
            choices.cancel()  # nothing left to cancel when they ended
            for _ in range(n):
                slots.release()

        try:
            choices.start()
            first = await until_disconnect(request, choices.next())
            if first is None:
                return Response(status_code=499)
            if first.kind == "error":
                return error_response(first.error)
            if sampling.stream:
                handed_over = True
                return EventStream(reply.chunks(choices, first), on_close=done)
            event, ended = first, 0
            while True:
                if event.kind == "error":
                    return error_response(event.error)
                reply.take(event)
                ended += event.kind == "end"
                if ended == n:
                    break
                event = await until_disconnect(request, choices.next())
                if event is None:
                    return Response(status_code=499)
            return JSONResponse(reply.whole(choices))
        finally:
            if not handed_over:
                done()

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    routes = [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
        Route("/v1/swarm", endpoint(swarm_status)),
        Route("/v1/models", endpoint(models)),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
    ]
    middleware = []
    if backend.cfg.cors_origins:  # browser front-ends served from elsewhere (opt-in)
        middleware.append(Middleware(CORSMiddleware, allow_origins=backend.cfg.cors_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, middleware=middleware)
    app.state.backend = backend
    return app


async def read_body(request: Request) -> bytes:
    """The request's body, refused past :data:`MAX_BODY` bytes (413) or :data:`BODY_TIMEOUT`
    seconds (408)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, f"the request body is {declared} bytes; at most {MAX_BODY} are taken")
    chunks, size = [], 0
    with anyio.move_on_after(BODY_TIMEOUT) as scope:
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(499, "the client went away while sending its request") from None
    if scope.cancelled_caught:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT:.0f} s")
    return b"".join(chunks)



async def wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable):
    """``await awaitable``, or None if the client goes away first."""
    result = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await wait_disconnect(request.receive)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        result = await awaitable
        group.cancel_scope.cancel()
    return result


class EventStream(StreamingResponse):
    """Server-sent events that end the moment the client goes away, also between writes (Starlette
    notices a disconnect at the next write only, and a failover can make that a while); then, and
    at every other end, ``on_close`` runs."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await wait_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()


class Reply:
    """OpenAI's response objects for one request of ``n`` choices: a whole one (each choice's
    events gathered with :meth:`take`), or the chunks of a stream. ``prompt_text``: a
    completion's prompt, put before each choice's text with ``echo``."""

    def __init__(self, chat: bool, model: str, prompt_ids: list[int], sampling, decode, prompt_text: str | None = None):
        self.chat, self.model, self.prompt_ids, self.prompt_text = chat, model, prompt_ids, prompt_text
        self.echo = prompt_text if sampling.echo else None
        self.include_usage, self.top = sampling.include_usage, sampling.logprobs
        self.n = sampling.n
        self.logprobs = Logprobs(decode)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.texts: list[list[str]] = [[] for _ in range(self.n)]
        self.finish: list[str | None] = [None] * self.n
        self.entries: list[list] = [[] for _ in range(self.n)]
        self.offsets: list[list[int]] = [[] for _ in range(self.n)]

    def usage(self, completion_tokens: int, speculation: dict | None = None) -> dict:
        """OpenAI's usage, and swarm's ``speculation`` (drafted and accepted tokens, round trips)
        where speculative decoding ran."""
        prompt = len(self.prompt_ids)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}
        if speculation is not None:
            usage["speculation"] = speculation
        return usage

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}

    def _base(self) -> int:
        """Where a choice's text begins in completions' offsets (which count from the prompt's start)."""
        return len(self.prompt_text or "")

    def take(self, event: Event) -> None:
        """Gather a text or end event for :meth:`whole`."""
        i = event.index
        self.texts[i].append(event.text)
        self.entries[i].extend(event.logprobs)
        self.offsets[i].extend(self._base() + o for o in event.offsets)
        if event.kind == "end":
            self.finish[i] = event.finish

    def _logprobs(self, entries: list, offsets: list[int], job=None) -> dict | None:
        """A choice's (or a chunk's) log-probability object; with ``job``, the echoed prompt's first."""
        if self.top is None:
            return None
        if self.chat:
            return self.logprobs.chat(entries)
        if job is not None and self.echo is not None:
            head, head_offsets = self.logprobs.prompt(self.prompt_ids, job.prompt_logprobs)
            entries, offsets = [*head, *entries], [*head_offsets, *offsets]
        return self.logprobs.completion(entries, offsets)

    def whole(self, choices) -> dict:
        out = []
        for i, job in enumerate(choices.jobs):
            text = "".join(self.texts[i])
            logprobs = self._logprobs(self.entries[i], self.offsets[i], job)
            if self.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": self.finish[i]})
            else:
                out.append({"index": i, "text": (self.echo or "") + text, "logprobs": logprobs, "finish_reason": self.finish[i]})
        kind = "chat.completion" if self.chat else "text_completion"
        return self._object(kind, out, usage=self.usage(choices.completion_tokens, choices.speculation))

    def chunk(self, index: int, text: str | None, finish: str | None = None, first: bool = False,
              logprobs: dict | None = None) -> str:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = self._object("chat.completion.chunk", [choice])
        else:
            obj = self._object("text_completion", [{"index": index, "text": text or "", "logprobs": logprobs,
                                                    "finish_reason": finish}])
        if self.include_usage:
            obj["usage"] = None
        return sse(obj)

    async def chunks(self, choices, event: Event):
        """The stream from the first event on: each choice's text chunks (tagged with its index;
        the first of a completion's choice with ``echo`` begins with the prompt), a last chunk
        with its finish reason; once every choice ended, one with the usage if asked, then
        ``[DONE]``. An error is sent as an ``error`` event (the `openai` client raises it), then
        ``[DONE]``."""
        first = [True] * self.n
        ended = 0
        while True:
            if event.kind == "error":
                yield sse(event.error.body())
                break
            i = event.index
            job = choices.jobs[i] if first[i] else None
            logprobs = None  # as OpenAI's: none on a chunk with no tokens
            if event.logprobs or (job is not None and self.echo is not None):
                logprobs = self._logprobs(event.logprobs, [self._base() + o for o in event.offsets], job)
            text = event.text if not (first[i] and self.echo is not None) else self.echo + event.text
            if event.kind == "text":
                yield self.chunk(i, text, first=first[i], logprobs=logprobs)
            else:
                yield self.chunk(i, (text or None) if self.chat else text, event.finish, first=first[i], logprobs=logprobs)
                ended += 1
            first[i] = False
            if ended == self.n:
                if self.include_usage:
                    yield sse(self._object("chat.completion.chunk" if self.chat else "text_completion", [],
                                           usage=self.usage(choices.completion_tokens, choices.speculation)))
                break
            event = await choices.next()
        yield "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: any free one). Raises ``OSError`` (in use, no such address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port or --host") from None
    return sock


def make_server(backend: Backend, sock: socket.socket):
    """A uvicorn server of the app on ``sock`` (run it with ``server.run(sockets=[sock])``)."""
    import uvicorn

    config = uvicorn.Config(create_app(backend), log_level="warning", lifespan="off", timeout_graceful_shutdown=5,
                            limit_concurrency=MAX_CONNECTIONS)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Ctrl-C: end the generations first, so their streams finish (an error event, then
            # [DONE]) and their connections close, instead of being cut after the grace period
            for job in list(backend.jobs):
                job.cancel(ApiError(503, "swarm api is shutting down", code="shutting_down"))
            await super().shutdown(sockets=sockets)

    return Server(config)


def serve_api(cfg: ApiConfig, host: str, port: int, on_ready=None) -> None:
    """Serve until interrupted. The socket is bound and the swarm joined before the first request
    is taken; ``on_ready(url, backend)`` is called then. Raises what :meth:`Backend.start` and :func:`bind`
    raise."""
    sock = bind(host, port)
    try:
        backend = Backend.start(cfg)
        try:
            server = make_server(backend, sock)
            name = sock.getsockname()
            url = f"http://{'[' + name[0] + ']' if ':' in name[0] else name[0]}:{name[1]}"
            if on_ready is not None:
                on_ready(url, backend)
            server.run(sockets=[sock])
        finally:
            backend.close()
    finally:
        sock.close()
