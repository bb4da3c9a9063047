"""Real kernel bandwidth shaping: a redis-server in a network namespace behind a veth pair.

The server's egress (what a client downloads) passes a token bucket (``tc qdisc
... tbf``) whose rate can be changed mid-transfer with ``tc qdisc change``, so a
bandwidth trace is replayed on a real TCP connection. Needs root, ``ip`` and
``tc`` (iproute2) and ``redis-server``; :func:`netshape_available` says whether
this machine has them.

Two details keep TCP flowing at the trace's rates. Segmentation offload is
off on the server side of the link (``gso_max_segs 1``): with it on, tbf queues
GSO super-packets of up to 64 KB, and after ``tc qdisc change`` to a lower rate
(a smaller bucket) a queued packet larger than the new bucket can never be paid
for; tbf then blocks for good (the benchmark's former "stall": the qdisc's sent
counter froze with two ~51 KB packets queued behind a 16 KB bucket while TCP
backed off to multi-second RTOs). And the bucket holds only ~2 ms of traffic,
because each change refills it: a 10 ms bucket changed every 100 ms carried
~12% more than the trace. Trace rates are TCP payload rates; tbf counts whole
frames, so it is set :data:`WIRE_PER_PAYLOAD` higher. The namespace, its veth
pair and the server are removed on exit. Addresses are in 10.231.0.0/16,
inside the namespace this process creates: a private test host of its own,
nothing else on any network.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import redis

from kvstore.testing.shaping import BandwidthTrace

_COUNTER = itertools.count(1)


def netshape_available() -> str | None:
    """``None`` when kernel shaping can run here, else the reason it cannot (short: "no root")."""
    if os.geteuid() != 0:
        return "no root"
    for tool in ("ip", "tc", "redis-server"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH"
    return None


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


FRAME_BYTES = 1514  # Ethernet frame of one full TCP segment at MTU 1500
WIRE_PER_PAYLOAD = FRAME_BYTES / 1448  # frame bytes per TCP payload byte (timestamps on: 1448-byte MSS)
BUCKET_S = 0.002  # the bucket holds this much traffic (at least two frames)


def _tbf(rate_Bps: float) -> list[str]:
    """tbf arguments for a payload rate of ``rate_Bps``: a small bucket and a 1 s queue (no drops)."""
    wire_Bps = rate_Bps * WIRE_PER_PAYLOAD
    rate_bit = max(int(wire_Bps * 8), 8_000)
    burst = max(int(wire_Bps * BUCKET_S), 2 * FRAME_BYTES)
    return ["tbf", "rate", f"{rate_bit}bit", "burst", f"{burst}b", "latency", "1s"]


class ShapedRedis:
    """A redis-server reachable at :attr:`url` through a link shaped to a settable rate."""

    def __init__(self, rate_Bps: float) -> None:
        reason = netshape_available()
        if reason:
            raise RuntimeError(reason)
        n = (os.getpid() * 7 + next(_COUNTER)) % 250 + 1
        self.namespace = f"kvs{os.getpid()}x{n}"
        self.host_if, self.ns_if = f"kvh{n}", f"kvn{n}"
        self.host_ip, self.server_ip = f"10.231.{n}.1", f"10.231.{n}.2"
        self.port = 6379
        self.rate_Bps = rate_Bps
        self._server: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.server_ip}:{self.port}/0"

    def _ns(self, *args: str) -> None:
        _run("ip", "netns", "exec", self.namespace, *args)

    def start(self) -> ShapedRedis:
        _run("ip", "netns", "add", self.namespace)
        try:
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _run("ip", "link", "set", self.ns_if, "netns", self.namespace)
            _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            self._ns("ip", "addr", "add", f"{self.server_ip}/24", "dev", self.ns_if)
            # one MSS per packet: no super-packet larger than the bucket (see the module docstring)
            self._ns("ip", "link", "set", self.ns_if, "gso_max_size", str(FRAME_BYTES), "gso_max_segs", "1")
            self._ns("ip", "link", "set", self.ns_if, "up")
            self._ns("ip", "link", "set", "lo", "up")
            self._ns("tc", "qdisc", "add", "dev", self.ns_if, "root", *_tbf(self.rate_Bps))
            self._server = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, "redis-server", "--bind", self.server_ip,
                 "--port", str(self.port), "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            client = redis.Redis(host=self.server_ip, port=self.port, socket_timeout=1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis-server in the namespace did not start") from None
                    time.sleep(0.05)
            client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def set_rate(self, rate_Bps: float) -> None:
        """Change the link's payload rate now (mid-transfer; ~4 ms for the ``tc`` call)."""
        self._ns("tc", "qdisc", "change", "dev", self.ns_if, "root", *_tbf(rate_Bps))
        self.rate_Bps = rate_Bps

    async def replay(self, trace: BandwidthTrace) -> None:
        """Follow ``trace`` from now on (cancel the task to stop)."""
        started = time.perf_counter()
        for t, rate in zip(trace.times, trace.rates_Bps):
            await asyncio.sleep(max(0.0, t - (time.perf_counter() - started)))
            if rate != self.rate_Bps:  # a change refills the bucket: skip the ones that change nothing
                await asyncio.to_thread(self.set_rate, rate)

    def stop(self) -> None:
        if self._server is not None:
            self._server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server.wait(timeout=5)
            self._server = None
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=20)


@contextlib.contextmanager
def shaped_redis(rate_Bps: float) -> Iterator[ShapedRedis]:
    """A :class:`ShapedRedis`, started and removed around the block."""
    server = ShapedRedis(rate_Bps).start()
    try:
        yield server
    finally:
        server.stop()
