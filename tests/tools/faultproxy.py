"""``FaultProxy``: an asyncio TCP proxy that breaks the traffic between a client and a server.

It listens on a loopback port, forwards every connection to ``target`` (redis-server,
an S3 endpoint) and, as its schedule says, breaks single *exchanges* (one request
and its response):

- ``reset``: abort the connection with a TCP RST part-way through the response;
- ``stall``: hold the response for ``seconds`` part-way through, then go on;
- ``truncate``: forward part of the response, then close the connection (FIN);
- ``corrupt``: flip ``nbytes`` bytes of the response (XOR with a random non-zero byte);
- ``http_error`` (``protocol="http"`` only): answer the request itself with
  ``503 Slow Down`` (S3's XML ``SlowDown`` body) or ``500 InternalError``,
  without forwarding it to the server.

A fault with ``stage="request"`` acts on the request instead, before the server
has it all: ``reset`` drops it unsent, ``stall`` delays it, ``truncate`` sends a
part and closes (a write cut off midway), ``corrupt`` damages what is sent.

A connection can also be reset or stalled as it is accepted (``on_connect``).
Where a fault acts is a fraction (``where``) of the response's length, read
from the HTTP head (``Content-Length``) or a RESP bulk-string header, so that
``where=0.5`` corrupts the middle of a payload rather than its framing; a
fault with ``min_response`` acts only on responses at least that long (it
waits for the next one otherwise). Corrupting framing bytes (HTTP heads, RESP
lengths) gives protocol errors rather than payload damage: both kinds are
wanted, since neither may end in wrong data.

Exchanges are delimited by parsing HTTP requests (``protocol="http"``) or, for
request/response protocols without pipelining such as RESP (``"resp"``, or
``"raw"``), by "the client speaks again after the server answered". The
schedule is :class:`RandomFaults` (seeded, for campaigns) or
:class:`ScriptedFaults` (an ordered list, for tests); :attr:`FaultProxy.injected`
counts the faults that really acted, by kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

FAULT_KINDS = ("reset", "stall", "truncate", "corrupt", "http_error")
PROTOCOLS = ("http", "resp", "raw")
_READ = 1 << 16
_MAX_HEAD = 1 << 16
_HEAD_MATCH_BYTES = 512


@dataclass(frozen=True)
class Fault:
    """One fault to inject into one exchange (or, from ``on_connect``, one new connection).

    ``where`` is the fraction of the response at which it acts; ``match`` a regex
    the request's first bytes must match; ``min_response`` the shortest response
    it acts on; ``mask`` the byte a ``corrupt`` XORs in (random and non-zero by default);
    ``offset`` an exact response byte offset (instead of ``where``); ``stage`` whether it
    acts on the ``"response"`` or on the ``"request"`` (see the module docstring).
    """

    kind: str
    where: float = 0.5
    seconds: float = 1.0
    nbytes: int = 1
    status: int = 503
    match: bytes | None = None
    min_response: int = 0
    mask: int | None = None
    offset: int | None = None
    stage: str = "response"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.where <= 1.0 or self.seconds < 0 or self.nbytes < 1:
            raise ValueError(f"invalid fault {self}")
        if self.kind == "http_error" and self.status not in (500, 503):
            raise ValueError("http_error answers 500 or 503")
        if self.mask is not None and not 0 < self.mask < 256:
            raise ValueError("a corrupt mask is a non-zero byte")
        if self.stage not in ("request", "response") or (self.stage == "request" and self.kind == "http_error"):
            raise ValueError(f"stage must be 'request' or 'response' ('response' for http_error), got {self.stage!r}")
        if self.offset is not None and self.offset < 0:
            raise ValueError("offset must be non-negative")

    def matches(self, request_head: bytes) -> bool:
        return self.match is None or re.search(self.match, request_head) is not None


class FaultSchedule(Protocol):
    """Decides which exchanges and connections get a fault."""

    def on_connect(self) -> Fault | None:
        """A ``reset`` or ``stall`` for a connection being accepted, or ``None``."""

    def on_request(self, request_head: bytes) -> Fault | None:
        """The fault for the exchange that starts with ``request_head``, or ``None``."""

    def release(self, fault: Fault) -> None:
        """``fault`` was handed out but never acted (its response was too short or absent)."""


class NoFaults:
    """Forward everything untouched."""

    def on_connect(self) -> Fault | None:
        return None

    def on_request(self, request_head: bytes) -> Fault | None:
        return None

    def release(self, fault: Fault) -> None:
        pass


class ScriptedFaults:
    """Faults in order: each goes to the next exchange whose request it matches."""

    def __init__(self, faults: Iterable[Fault] = (), *, on_connect: Iterable[Fault] = ()) -> None:
        self.pending: deque[Fault] = deque(faults)
        self.connect_faults: deque[Fault] = deque(on_connect)

    def on_connect(self) -> Fault | None:
        return self.connect_faults.popleft() if self.connect_faults else None

    def on_request(self, request_head: bytes) -> Fault | None:
        for i, fault in enumerate(self.pending):
            if fault.matches(request_head):
                del self.pending[i]
                return fault
        return None

    def release(self, fault: Fault) -> None:
        self.pending.appendleft(fault)


class RandomFaults:
    """Each exchange gets a fault with probability ``rate``, of a kind drawn by ``weights``.

    Deterministic for a given ``seed`` and order of requests. ``stall_s``,
    ``where`` and ``corrupt_bytes`` are (low, high) ranges drawn uniformly;
    ``request_stage`` is the share of ``reset``, ``stall`` and ``truncate`` faults
    that act on the request rather than the response; ``match`` limits faults to
    requests whose head matches it.
    """

    def __init__(
        self,
        rate: float = 0.2,
        weights: dict[str, float] | None = None,
        *,
        seed: int = 0,
        connect_rate: float = 0.0,
        stall_s: tuple[float, float] = (0.05, 1.0),
        where: tuple[float, float] = (0.02, 0.98),
        corrupt_bytes: tuple[int, int] = (1, 4),
        statuses: tuple[int, ...] = (503, 500),
        request_stage: float = 0.0,
        match: bytes | None = None,
        min_response: int = 0,
    ) -> None:
        self.rate = rate
        self.weights = dict(weights or {"reset": 1, "stall": 1, "truncate": 1, "corrupt": 1})
        if not self.weights or any(k not in FAULT_KINDS for k in self.weights):
            raise ValueError(f"weights must name fault kinds from {FAULT_KINDS}")
        self.rng = random.Random(seed)
        self.connect_rate = connect_rate
        self.stall_s, self.where, self.corrupt_bytes = stall_s, where, corrupt_bytes
        self.statuses = statuses
        self.request_stage = request_stage
        self.match = match
        self.min_response = min_response

    def on_connect(self) -> Fault | None:
        if self.rng.random() >= self.connect_rate:
            return None
        if self.rng.random() < 0.5:
            return Fault("reset")
        return Fault("stall", seconds=self.rng.uniform(*self.stall_s))

    def on_request(self, request_head: bytes) -> Fault | None:
        if self.match is not None and re.search(self.match, request_head) is None:
            return None
        if self.rng.random() >= self.rate:
            return None
        kind = self.rng.choices(list(self.weights), list(self.weights.values()))[0]
        on_request = kind in ("reset", "stall", "truncate") and self.rng.random() < self.request_stage
        return Fault(
            kind,
            stage="request" if on_request else "response",
            where=self.rng.uniform(*self.where),
            seconds=self.rng.uniform(*self.stall_s),
            nbytes=self.rng.randint(*self.corrupt_bytes),
            status=self.rng.choice(self.statuses),
            min_response=self.min_response,
        )

    def release(self, fault: Fault) -> None:
        pass


@dataclass(eq=False)
class _Exchange:
    """One request and its response on one connection."""

    head: bytes
    method: bytes
    fault: Fault | None
    received: int = 0  # response bytes read from the server so far
    at: int | None = None  # response offset where the fault acts, once known
    held: bytearray = field(default_factory=bytearray)  # response bytes held until ``at`` is known
    done: bool = False  # the fault acted (or was released)


@dataclass(eq=False)
class _Link:
    """A proxied connection: the client's and the server's streams and the current exchange."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    exchange: _Exchange | None = None
    request_buffer: bytearray = field(default_factory=bytearray)
    body_left: int = 0
    swallowing: bool = False  # the current request is answered by the proxy (http_error)
    opaque: bool = False  # framing lost (chunked body, huge head): forward as it comes
    closed: bool = False


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``target_host:target_port`` that injects faults.

    Use ``async with FaultProxy(host, port, schedule=...) as proxy`` and connect to
    ``proxy.host:proxy.port``; replace :attr:`schedule` at any time.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        schedule: FaultSchedule | None = None,
        protocol: str = "raw",
        seed: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.target = (target_host, target_port)
        self.schedule: FaultSchedule = schedule or NoFaults()
        self.protocol = protocol
        self.host = host
        self.port = 0
        self.injected: Counter[str] = Counter()
        self.connections = 0
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def total_injected(self) -> int:
        """How many faults acted so far, all kinds together."""
        return sum(self.injected.values())

    @property
    def address(self) -> str:
        """``host:port`` to connect to."""
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen on a free port of ``host``."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every proxied connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _count(self, fault: Fault) -> None:
        self.injected[fault.kind] += 1

    # -- connections -----------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        link = _Link(writer)
        try:
            fault = self.schedule.on_connect()
            if fault is not None and fault.kind == "reset":
                self._count(fault)
                self._close(link, reset=True)
                return
            if fault is not None and fault.kind == "stall":
                self._count(fault)
                await asyncio.sleep(fault.seconds)
            try:
                server_reader, link.server = await asyncio.open_connection(*self.target)
            except OSError:  # the server is down: refuse the client as it would
                self._close(link, reset=True)
                return
            pumps = [
                asyncio.create_task(self._requests(link, reader)),
                asyncio.create_task(self._responses(link, server_reader)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cancelled handler ends quietly (3.11 logs handlers that end cancelled)
        finally:
            self._close(link)
            self._tasks.discard(task)

    def _close(self, link: _Link, *, reset: bool = False) -> None:
        if link.closed:
            return
        link.closed = True
        ex = link.exchange
        if ex is not None and ex.fault is not None and not ex.done:
            ex.done = True
            self.schedule.release(ex.fault)
        if reset:
            _abort(link.client)
        else:
            link.client.close()
        if link.server is not None:
            link.server.close()

    def _begin(self, link: _Link, head: bytes, method: bytes = b"") -> _Exchange:
        previous = link.exchange
        if previous is not None and previous.fault is not None and not previous.done:
            previous.done = True
            self.schedule.release(previous.fault)
        fault = self.schedule.on_request(head[:_HEAD_MATCH_BYTES])
        if fault is not None and fault.kind == "http_error" and self.protocol != "http":
            self.schedule.release(fault)
            fault = None
        link.exchange = _Exchange(head[:_HEAD_MATCH_BYTES], method, fault)
        return link.exchange

    # -- client -> server --------------------------------------------------------
    async def _requests(self, link: _Link, reader: asyncio.StreamReader) -> None:
        assert link.server is not None
        while data := await reader.read(_READ):
            if self.protocol == "http" and not link.opaque:
                await self._http_requests(link, data)
                continue
            ex = link.exchange
            if ex is None or ex.received > 0 or ex.held:
                ex = self._begin(link, data)
                data = await self._faulty_request(link, ex, data)
                if data is None:
                    return
            link.server.write(data)
            await link.server.drain()

    async def _http_requests(self, link: _Link, data: bytes) -> None:
        """Split the client's bytes into HTTP requests; forward them, or answer them (http_error)."""
        assert link.server is not None
        buffer = link.request_buffer
        buffer += data
        while buffer:
            if link.body_left > 0:
                part = bytes(buffer[: link.body_left])
                del buffer[: len(part)]
                link.body_left -= len(part)
                if not link.swallowing:
                    link.server.write(part)
                elif link.body_left == 0:
                    await self._answer_error(link)
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:  # not HTTP as we know it: stop parsing
                    link.opaque = True
                    link.server.write(bytes(buffer))
                    buffer.clear()
                break
            head = bytes(buffer[: end + 4])
            del buffer[: end + 4]
            method, length, chunked = _request_framing(head)
            ex = self._begin(link, head, method)
            link.body_left = length
            link.swallowing = ex.fault is not None and ex.fault.kind == "http_error" and not chunked
            if chunked:  # bodies we do not frame: forward the rest of the connection as it comes
                link.opaque = True
                link.server.write(head + bytes(buffer))
                buffer.clear()
                break
            if link.swallowing:
                if b"100-continue" in head.lower():  # the client may not send the body now:
                    await self._answer_error(link, close=True)  # answer and drop the connection
                    return
                if length == 0:
                    await self._answer_error(link)
                continue
            sent = await self._faulty_request(link, ex, head + bytes(buffer[: link.body_left]))
            if sent is None:
                return
            del buffer[: len(sent) - len(head)]
            link.body_left -= len(sent) - len(head)
            link.server.write(sent)
        await link.server.drain()

    async def _faulty_request(self, link: _Link, ex: _Exchange, data: bytes) -> bytes | None:
        """Apply a request-stage fault to the first bytes of a request; ``None`` once cut."""
        fault = ex.fault
        if fault is None or fault.stage != "request":
            return data
        ex.done = True
        self._count(fault)
        position = min(len(data) - 1, fault.offset if fault.offset is not None else int(fault.where * len(data)))
        if fault.kind == "stall":
            await asyncio.sleep(fault.seconds)
            return data
        if fault.kind == "corrupt":
            damaged = bytearray(data)
            for i in range(position, min(len(damaged), position + fault.nbytes)):
                damaged[i] ^= fault.mask or self._rng.randrange(1, 256)
            return bytes(damaged)
        if fault.kind == "truncate" and link.server is not None:
            link.server.write(data[:position])
            with contextlib.suppress(OSError):
                await link.server.drain()
        self._close(link, reset=fault.kind == "reset")
        return None

    async def _answer_error(self, link: _Link, *, close: bool = False) -> None:
        ex = link.exchange
        assert ex is not None and ex.fault is not None
        ex.done = True
        link.swallowing = False
        self._count(ex.fault)
        link.client.write(_s3_error(ex.fault.status, with_body=ex.method != b"HEAD", close=close))
        await link.client.drain()
        if close:
            self._close(link)

    # -- server -> client --------------------------------------------------------
    async def _responses(self, link: _Link, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(_READ):
            ex = link.exchange
            if ex is None or ex.fault is None or ex.done:
                if ex is not None:
                    ex.received += len(data)
                if not await self._forward(link, data):
                    return
                continue
            if not await self._faulty_response(link, ex, data):
                return

    async def _faulty_response(self, link: _Link, ex: _Exchange, data: bytes) -> bool:
        """Forward ``data`` with ``ex``'s fault applied; ``False`` once the connection is cut."""
        fault = ex.fault
        assert fault is not None
        start = ex.received - len(ex.held)
        ex.received += len(data)
        if ex.at is None:
            ex.held += data
            if self.protocol == "http":  # an interim 100 Continue goes on at once: the client waits for it
                interim = _interim_heads(ex.held)
                if interim:
                    if not await self._forward(link, bytes(ex.held[:interim])):
                        return False
                    del ex.held[:interim]
                    start += interim
            total = self._response_length(ex)
            if total is None and self.protocol == "http" and len(ex.held) < _MAX_HEAD:
                return True  # the head is not complete yet
            size = total if total is not None else len(ex.held)
            data, ex.held = bytes(ex.held), bytearray()
            if size < max(1, fault.min_response):
                ex.done = True
                self.schedule.release(fault)
                return await self._forward(link, data)
            ex.at = start + min(fault.offset if fault.offset is not None else int(fault.where * size), size - 1)
        offset = max(0, ex.at - start)
        if offset >= len(data):
            return await self._forward(link, data)
        ex.done = True
        self._count(fault)
        if fault.kind == "corrupt":
            damaged = bytearray(data)
            for position in range(offset, min(len(damaged), offset + fault.nbytes)):
                damaged[position] ^= fault.mask or self._rng.randrange(1, 256)
            return await self._forward(link, bytes(damaged))
        if not await self._forward(link, data[:offset], flush=True):
            return False
        if fault.kind == "stall":
            await asyncio.sleep(fault.seconds)
            return await self._forward(link, data[offset:])
        self._close(link, reset=fault.kind == "reset")
        return False

    async def _forward(self, link: _Link, data: bytes, *, flush: bool = False) -> bool:
        if link.closed:
            return False
        link.client.write(data)
        if flush:  # everything before the fault reaches the client's socket first
            link.client.transport.set_write_buffer_limits(0)
        await link.client.drain()
        return True

    def _response_length(self, ex: _Exchange) -> int | None:
        """The whole response's length from its first bytes, or ``None`` if not yet known
        (an HTTP response without ``Content-Length`` counts what has arrived)."""
        held = bytes(ex.held)
        if self.protocol == "http":
            end = held.find(b"\r\n\r\n")
            if end < 0:
                return None
            if ex.method == b"HEAD" or _status(held) in (204, 304):
                return end + 4
            length = _content_length(held[: end + 4])
            return len(held) if length is None else end + 4 + length  # chunked: what came so far
        match = re.match(rb"\$(\d+)\r\n", held)
        if match:
            return match.end() + int(match.group(1)) + 2
        line = held.find(b"\r\n")
        if line >= 0 and held[:1] in (b"+", b"-", b":", b"_", b"#", b","):
            return line + 2
        return None


# -- helpers ---------------------------------------------------------------------


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _header(head: bytes, name: bytes) -> bytes | None:
    match = re.search(rb"\r\n" + re.escape(name) + rb"[ \t]*:[ \t]*([^\r\n]*)", head, re.IGNORECASE)
    return None if match is None else match.group(1).strip()


def _content_length(head: bytes) -> int | None:
    value = _header(head, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _status(head: bytes) -> int | None:
    match = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})", head)
    return None if match is None else int(match.group(1))


def _interim_heads(held: bytes | bytearray) -> int:
    """The length of the complete interim (1xx) response heads at the start of ``held``."""
    position = 0
    while True:
        status = _status(bytes(held[position : position + 16]))
        end = held.find(b"\r\n\r\n", position)
        if status is None or not 100 <= status < 200 or end < 0:
            return position
        position = end + 4


def _request_framing(head: bytes) -> tuple[bytes, int, bool]:
    """An HTTP request head's method, body length and whether the body is chunked."""
    method = head.split(b" ", 1)[0].upper()
    chunked = b"chunked" in (_header(head, b"transfer-encoding") or b"").lower()
    return method, _content_length(head) or 0, chunked


_S3_ERRORS = {
    503: (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
    500: (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error. Please try again."),
}


def _s3_error(status: int, *, with_body: bool = True, close: bool = False) -> bytes:
    """An S3-style error response (XML body), as the real service sends under load."""
    reason, code, message = _S3_ERRORS[status]
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + b"</Code><Message>"
        + message + b"</Message><RequestId>FAULTPROXY</RequestId></Error>"
    )
    length = len(body)
    head = (
        b"HTTP/1.1 " + reason + b"\r\nContent-Type: application/xml\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\nx-amz-request-id: FAULTPROXY\r\n"
        b"Server: AmazonS3\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"
    )
    return head + (body if with_body else b"")
