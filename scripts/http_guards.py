"""Guards for an HTTP server on uvicorn that hold against slow and stalled clients: a deadline for each request's
head and a cap on open connections (GuardedH11, uvicorn's HTTP/1.1 connection), and request bodies read within a
size limit and a silence timeout (BodyGuard, ASGI middleware). Errors are JSON {"error": kind, "detail": ...}."""

import asyncio
import json
from http import HTTPStatus

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

CLOSE = {"connection": "close"}  # for answers given before the body was read whole: the rest would not be waited for
DRAIN_STALL_SECONDS = 1.0  # during the drain, a body silent this long is given up on (a sending client gets its answer)


class RequestError(Exception):
    """A bad request, answered with its status and {"error": kind, "detail": what was wrong}."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class BodyGuard:
    """Request bodies read within limits. 413 for one over max_bytes: at once from its Content-Length, or as soon as a
    streamed (chunked) body passes it, so an oversized upload is never read whole. 408 when a body stalls: nothing of
    it arrives for `timeout` seconds, or for DRAIN_STALL_SECONDS once drain() is called."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.draining = False
        self.reads: set[asyncio.Timeout] = set()  # the deadlines of body reads under way

    def drain(self):
        """SIGTERM: from now on, a silent body only holds up the exit for DRAIN_STALL_SECONDS."""
        if self.draining:
            return
        self.draining = True
        soon = asyncio.get_running_loop().time() + DRAIN_STALL_SECONDS
        for read in self.reads:
            read.reschedule(min(read.when(), soon))

    def too_large(self) -> RequestError:
        return RequestError(
            413, "body_too_large", f"the request body is larger than {self.max_bytes / 2**20:g} MB (--max-body-mb)"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            err = self.too_large()
            return await error_response(err.status, err.error, err.detail, CLOSE)(scope, receive, send)
        received, complete = 0, False

        async def guarded_receive():
            # Raised from inside the endpoint, so its RequestError handler answers.
            nonlocal received, complete
            if complete:
                return await receive()  # after the body only a disconnect can come, whenever: nothing to time
            message = await self.next_part(receive)
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > self.max_bytes:
                raise self.too_large()
            return message

        await self.app(scope, guarded_receive, send)

    async def next_part(self, receive):
        try:
            async with asyncio.timeout(min(self.timeout, DRAIN_STALL_SECONDS) if self.draining else self.timeout) as read:
                self.reads.add(read)
                return await receive()
        except TimeoutError:
            stall = f"{DRAIN_STALL_SECONDS:g} s once shutting down" if self.draining else f"{self.timeout:g} s (--body-timeout)"
            detail = f"the body stopped arriving: nothing for {stall}"
            raise RequestError(408, "request_timeout", detail) from None
        finally:
            self.reads.discard(read)


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 connection with the guards an ASGI app cannot add, since they act before it is called:
    a cap on open connections, and a deadline for each request's head. on_drain is called as SIGTERM starts the drain."""

    def __init__(self, max_connections: int, head_timeout: float, on_drain, **uvicorn_args):
        super().__init__(**uvicorn_args)
        self.max_connections, self.head_timeout, self.on_drain = max_connections, head_timeout, on_drain
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.refuse(503, "too_many_connections", f"{self.max_connections} connections are open (--max-connections)")
        else:
            self.expect_head()

    def expect_head(self):
        detail = f"the request head did not arrive within {self.head_timeout:g} s (--header-timeout)"
        self.head_deadline = self.loop.call_later(self.head_timeout, self.refuse, 408, "request_timeout", detail)

    def data_received(self, data: bytes):
        if self.head_deadline is None and self.conn.their_state is h11.IDLE:
            self.expect_head()  # the next request on a kept-alive connection has begun
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in
            self.stop_head_clock()

    def stop_head_clock(self):
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def connection_lost(self, exc):
        self.stop_head_clock()
        super().connection_lost(exc)

    def shutdown(self):
        self.on_drain()  # uvicorn calls this on every connection as the drain begins
        super().shutdown()

    def refuse(self, status: int, error: str, detail: str):
        """Answer before any request was read, and close. Written raw: no request means no h11 cycle to answer in."""
        self.logger.warning("%s:%d - %d %s", *self.client, status, detail)
        body = json.dumps({"error": error, "detail": detail}).encode()
        head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        self.transport.write(f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()
