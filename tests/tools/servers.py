"""Real servers on free loopback ports, for tests and benchmarks.

Each helper is a context manager that starts a server, waits until it answers,
yields a small dataclass describing it, and stops it on exit:

- :func:`moto_server` -- an S3 API (moto's ``ThreadedMotoServer``) with one
  bucket, run in a child process so it does not share this process's GIL;
- :func:`redis_server` -- one ``redis-server`` without persistence;
- :func:`redis_cluster` -- ``nodes`` cluster-enabled ``redis-server`` processes
  joined with ``redis-cli --cluster create``.

When a program is missing, :class:`ServerUnavailable` says which one, so a test
can skip (or fail, on CI) with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


class ServerUnavailable(RuntimeError):
    """A test server cannot be started here (program missing, failed to start)."""


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"{what} did not become ready within {timeout:.0f}s")
        time.sleep(0.02)


# -- S3 (moto) -------------------------------------------------------------------

# Runs in the child: moto's server, with conditional writes (If-None-Match /
# If-Match) made atomic as on real S3 (moto checks, then writes, in two steps).
_MOTO_CHILD = r"""
import logging, sys, threading
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.moto_server import threaded_moto_server as tms

class AtomicConditionalWrites:
    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
    def __call__(self, environ, start_response):
        if "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ:
            with self.lock:
                return self.app(environ, start_response)
        return self.app(environ, start_response)

_make_server = tms.make_server
def make_server(host, port, app, *args, **kwargs):
    return _make_server(host, port, AtomicConditionalWrites(app), *args, **kwargs)
tms.make_server = make_server

server = tms.ThreadedMotoServer(ip_address=sys.argv[1], port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes the pipe (or dies)
server.stop()
"""


@dataclass(frozen=True)
class S3Server:
    """A running S3 API endpoint with one bucket and static credentials."""

    endpoint_url: str
    bucket: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"

    @property
    def url(self) -> str:
        """``s3://bucket`` for :func:`kvstore.backends.open_store`."""
        return f"s3://{self.bucket}"

    def storage_options(self) -> dict[str, Any]:
        """Keyword options for ``open_store(url, **options)`` and ``s3fs.S3FileSystem``."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"region_name": self.region},
        }


@contextlib.contextmanager
def moto_server(bucket: str = "kvstore-test", timeout: float = 60.0) -> Iterator[S3Server]:
    """Start moto's S3 server on a free loopback port with ``bucket`` created."""
    if len(bucket) < 3:
        raise ValueError("S3 bucket names need at least 3 characters")
    try:
        import moto  # noqa: F401
    except ImportError as exc:
        raise ServerUnavailable("moto is not installed (pip install 'moto[server]')") from exc
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_CHILD, LOOPBACK],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise ServerUnavailable(f"moto server failed to start (exit code {proc.poll()})")
        server = S3Server(endpoint_url=f"http://{LOOPBACK}:{line}", bucket=bucket)
        _create_bucket(server, timeout)
        yield server
    finally:
        _stop(proc, close_stdin=True)


def _create_bucket(server: S3Server, timeout: float) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.key,
        aws_secret_access_key=server.secret,
        region_name=server.region,
    )
    _wait_until(lambda: client.create_bucket(Bucket=server.bucket) is not None, timeout, "moto")


# -- Redis -----------------------------------------------------------------------


def redis_server_program() -> str:
    """The path of ``redis-server``, or :class:`ServerUnavailable` saying it is missing."""
    program = shutil.which("redis-server")
    if program is None:
        raise ServerUnavailable("redis-server is not installed (apt-get install -y redis-server)")
    return program


def _redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    program = shutil.which("redis-cli")
    if program is None:
        raise ServerUnavailable("redis-cli is not installed (apt-get install -y redis-tools)")
    done = subprocess.run(
        [program, "-h", LOOPBACK, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout + done.stderr


def _ping(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


@dataclass
class RedisServer:
    """A ``redis-server`` process on ``host:port``; :meth:`kill` and :meth:`start` it at will."""

    port: int
    workdir: Path
    extra_args: tuple[str, ...] = ()
    host: str = LOOPBACK
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``redis://host:port/0``."""
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start the server (again) on the same port and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return
        self.process = subprocess.Popen(
            [
                redis_server_program(),
                *("--port", str(self.port), "--bind", self.host, "--dir", str(self.workdir)),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise ServerUnavailable(f"redis-server on port {self.port} exited")
            return _ping(self.port)

        _wait_until(ready, timeout, f"redis-server on port {self.port}")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None:
            _stop(self.process, kill=True)


def _start_redis(workdir: Path, extra_args: tuple[str, ...] = (), tries: int = 5) -> RedisServer:
    redis_server_program()
    for attempt in range(tries):
        server = RedisServer(port=free_port(), workdir=workdir, extra_args=extra_args)
        try:
            server.start()
            return server
        except ServerUnavailable:  # most likely the port was taken meanwhile
            server.kill()
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Start one ``redis-server`` (no persistence) on a free loopback port."""
    with tempfile.TemporaryDirectory(prefix="kvstore-redis-") as tmp:
        server = _start_redis(Path(tmp))
        try:
            yield server
        finally:
            server.kill()


@dataclass(frozen=True)
class RedisClusterInfo:
    """A running Redis Cluster; :attr:`url` names one node, the client finds the rest."""

    nodes: tuple[RedisServer, ...]

    @property
    def url(self) -> str:
        """``redis+cluster://host:port`` of the first node."""
        first = self.nodes[0]
        return f"redis+cluster://{first.host}:{first.port}"


@contextlib.contextmanager
def redis_cluster(nodes: int = 3, timeout: float = 30.0) -> Iterator[RedisClusterInfo]:
    """Start ``nodes`` cluster-enabled servers and join them (no replicas)."""
    if nodes < 3:
        raise ValueError("redis-cli --cluster create needs at least 3 primaries")
    with tempfile.TemporaryDirectory(prefix="kvstore-redis-cluster-") as tmp:
        servers: list[RedisServer] = []
        try:
            for i in range(nodes):
                workdir = Path(tmp) / f"node{i}"
                workdir.mkdir()
                args = (
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(workdir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "5000",
                )
                servers.append(_start_redis(workdir, args))
            addresses = [f"{s.host}:{s.port}" for s in servers]
            out = _redis_cli(
                servers[0].port,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
                timeout=timeout,
            )
            if "[OK] All 16384 slots covered" not in out:
                raise ServerUnavailable(f"redis-cli --cluster create failed:\n{out}")
            _wait_until(
                lambda: all(
                    "cluster_state:ok" in _redis_cli(s.port, "cluster", "info") for s in servers
                ),
                timeout,
                "redis cluster",
            )
            yield RedisClusterInfo(tuple(servers))
        finally:
            for server in servers:
                server.kill()


def _stop(proc: subprocess.Popen[Any], *, kill: bool = False, close_stdin: bool = False) -> None:
    if proc.poll() is None:
        if close_stdin and proc.stdin is not None:
            proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if proc.poll() is None:
            proc.kill() if kill else proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
