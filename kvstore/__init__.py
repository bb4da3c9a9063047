"""kvstore: store LLM KV caches in S3 or Redis and load them back faster than recomputing them.

The entry points are :class:`KVStore` (async) and :class:`SyncKVStore` (blocking);
byte stores open from URLs with :func:`open_store`; every deliberate error is a
:class:`KVStoreError`.
"""

from kvstore.backends import open_store
from kvstore.errors import KVStoreError
from kvstore.store import KVStore
from kvstore.sync import SyncKVStore

__version__ = "0.1.0"
__all__ = ["KVStore", "KVStoreError", "SyncKVStore", "open_store", "__version__"]
