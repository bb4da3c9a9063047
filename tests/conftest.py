"""Session-wide test servers: one moto S3, one redis-server and one 3-node Redis Cluster.

A missing ``redis-server`` (or moto) skips the tests that need it, with the
reason, except when the ``CI`` environment variable is set: there the tests
fail, so that CI cannot pass without really testing Redis and S3.

The real-model fixtures (``smollm2``...) come from the plugin
:mod:`tests.tools.model_fixtures`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.tools.servers import (
    RedisServer,
    S3Server,
    ServerUnavailable,
    moto_server,
    redis_cluster,
    redis_server,
)

# real-model fixtures (smollm2, smollm2_docs, tiny_gguf): see tests/tools/model_fixtures.py
pytest_plugins = ["tests.tools.model_fixtures"]


def server_unavailable(reason: str) -> None:
    """Skip the current test, or fail it when running on CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this cannot be skipped)", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def started(manager: contextlib.AbstractContextManager[Any]) -> Iterator[Any]:
    """Enter a server context manager, turning :class:`ServerUnavailable` into a skip."""
    try:
        server = manager.__enter__()
    except ServerUnavailable as exc:
        server_unavailable(str(exc))
    try:
        yield server
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """An S3 endpoint (moto) with the bucket ``kvstore-test``."""
    with started(moto_server("kvstore-test")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://127.0.0.1:PORT/0`` of a redis-server shared by the session."""
    with started(redis_server()) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """``redis+cluster://127.0.0.1:PORT`` of a 3-node cluster shared by the session."""
    with started(redis_cluster(nodes=3)) as cluster:
        yield cluster.url


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A redis-server for one test alone, which it may kill and restart."""
    with started(redis_server()) as server:
        yield server
