"""kvstore: store LLM KV caches in S3 or Redis and load them back faster than recomputing them."""

__version__ = "0.1.0"
