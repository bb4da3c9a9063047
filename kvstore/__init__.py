"""kvstore: store LLM KV caches in S3 or Redis and load them back faster than recomputing them.

The entry points are :class:`KVStore` (async) and :class:`SyncKVStore` (blocking);
byte stores open from URLs with :func:`open_store`; every deliberate error is a
:class:`KVStoreError`.
"""

import os

# torch's OpenMP threads busy-wait after each parallel region; on a small CPU that
# spinning starves the entropy coder's worker threads (measurements in
# benchmarks/RESULTS.md). Passive waiting, unless the application chose otherwise;
# it takes effect only if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kvstore.backends import open_store  # noqa: E402
from kvstore.errors import KVStoreError  # noqa: E402
from kvstore.store import KVStore  # noqa: E402
from kvstore.sync import SyncKVStore  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KVStore", "KVStoreError", "SyncKVStore", "open_store", "__version__"]
