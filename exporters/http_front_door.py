"""The HTTP and metrics ports that ``zsaq-pipeline serve`` shows to clients: a thin reverse proxy (aiohttp) in
front of Triton's own HTTP and metrics endpoints, which listen on private loopback ports.

Why it exists: Triton 2.51 answers an inference request whose body is not JSON with HTTP 500 (its JSON errors
are INTERNAL), which a client retries as a server fault; and requests Triton rejects before they reach a model
(wrong datatype, shape or input name) appear in none of its failure counters. The front door answers the first
with a 400 and a one-line reason, and counts every HTTP error response it relays or gives, by model and status,
in ``zsaq_http_request_failure`` on the metrics endpoint next to Triton's own metrics. Everything else passes
through byte for byte (compressed bodies included); gRPC goes to Triton directly."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import logging
import re
import threading
import zlib
from collections import Counter
from typing import Any

from calib.errors import PipelineError

INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/(?:infer|generate)$")
HEADER_LENGTH = "Inference-Header-Content-Length"
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
FAILURE_METRIC = "zsaq_http_request_failure"


def body_error(body: bytes, headers: Any) -> str | None:
    """Why an inference request's body is not a JSON request object (None when it is one). With the binary
    tensor extension only the first ``Inference-Header-Content-Length`` bytes are JSON."""
    try:
        encoding = headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if HEADER_LENGTH in headers:
            length = int(headers[HEADER_LENGTH])
            if not 0 <= length <= len(body):
                return f"{HEADER_LENGTH} {length} is outside the body's {len(body)} bytes"
            body = body[:length]
        request = json.loads(body)
    except (OSError, EOFError, zlib.error):
        return f"the request body is not valid {encoding} data"
    except ValueError as exc:  # int(), JSON and UTF-8 errors
        return f"the request body is not valid JSON ({str(exc).splitlines()[0]})"
    if not isinstance(request, dict):
        return f"the request body is JSON but not an object (a {type(request).__name__})"
    return None


def _request_id(body: bytes, headers: Any, fallback: str) -> str:
    """The client's request id ("id" in the JSON body) when it sent one, else ``fallback``."""
    if HEADER_LENGTH in headers or headers.get("Content-Encoding"):
        return fallback
    try:
        value = json.loads(body).get("id")
    except (ValueError, AttributeError):
        return fallback
    return str(value) if value else fallback


class FrontDoor:
    """The proxy, on its own event loop in a background thread; a context manager."""

    def __init__(self, host: str, ports: tuple[int, int], upstream: tuple[int, int], logger: logging.Logger) -> None:
        self.host, self.ports, self.upstream, self.logger = host, ports, upstream, logger
        self.failures: Counter[tuple[str, int]] = Counter()
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-front-door", daemon=True)
        self._runners: list[Any] = []
        self._session: Any = None

    def __enter__(self) -> FrontDoor:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except OSError as exc:
            self.__exit__()
            raise PipelineError(f"the HTTP front door could not listen on {self.host}: {exc.strerror}") from None
        return self

    async def _start(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        # the client's own headers only: aiohttp would otherwise ask Triton for gzip on every request
        self._session = ClientSession(
            connector=TCPConnector(limit=0),
            timeout=ClientTimeout(total=None),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "Content-Type", "User-Agent", "Accept"),
        )
        for port, handler in zip(self.ports, (self._relay, self._metrics)):
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, self.host, port).start()
            self._runners.append(runner)

    async def _relay(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        match = INFER_PATH.match(request.path)
        model = match["model"] if match else ""
        error = body_error(body, request.headers) if match and request.method == "POST" else None
        if error is not None:
            return self._refused(model, 400, error, body, request.headers)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = f"http://{self.host}:{self.upstream[0]}{request.path_qs}"
        async with self._session.request(request.method, url, data=body or None, headers=headers) as upstream:
            data = await upstream.read()
            reply = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if upstream.status >= 400 and match:
                reason = data.decode("utf-8", "replace")
                try:
                    reason = json.loads(reason)["error"]
                except (ValueError, KeyError, TypeError):
                    pass
                self._count(model, upstream.status, reason, body, request.headers)
            return web.Response(body=data, status=upstream.status, headers=reply)

    def _count(self, model: str, status: int, reason: str, body: bytes, headers: Any) -> None:
        self.failures[(model, status)] += 1
        request_id = _request_id(body, headers, f"http-{next(self._ids)}")
        self.logger.info("request %s to %s refused (%d): %s", request_id, model, status, reason.splitlines()[0])

    def _refused(self, model: str, status: int, reason: str, body: bytes, headers: Any) -> Any:
        from aiohttp import web

        self._count(model, status, reason, body, headers)
        return web.json_response({"error": reason}, status=status)

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        url = f"http://{self.host}:{self.upstream[1]}{request.path_qs}"
        async with self._session.get(url) as upstream:
            text = (await upstream.read()).decode("utf-8")
            if request.path != "/metrics" or upstream.status != 200:
                return web.Response(text=text, status=upstream.status, content_type="text/plain")
        lines = [
            f"# HELP {FAILURE_METRIC} HTTP inference requests answered with an error status (client errors "
            "included), by model and status",
            f"# TYPE {FAILURE_METRIC} counter",
        ]
        for (model, status), count in sorted(self.failures.items()):
            lines.append(f'{FAILURE_METRIC}{{model="{model}",code="{status}"}} {count}')
        return web.Response(text=text + "\n".join(lines) + "\n", content_type="text/plain")

    def __exit__(self, *_: object) -> None:
        async def close() -> None:
            for runner in self._runners:
                await runner.cleanup()
            if self._session is not None:
                await self._session.close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop.close()
