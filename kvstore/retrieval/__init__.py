"""PQ codebooks and codes stored beside the KV, and retrieval-based attention over them (PQCache).

- :mod:`kvstore.retrieval.pq`: batched k-means, PQ train / encode / decode, :class:`PQIndex`;
- :mod:`kvstore.retrieval.store`: PQ objects on a :class:`~kvstore.store.KVStore`;
- :mod:`kvstore.retrieval.attention`: token selection and sparse attention;
- :mod:`kvstore.retrieval.sources`: where selected K/V come from (tensors, the store);
- :mod:`kvstore.retrieval.hf`: transformers decoding with retrieval attention.
"""

from kvstore.retrieval.attention import RetrievalConfig
from kvstore.retrieval.pq import PQConfig, PQIndex, build_index

__all__ = ["PQConfig", "PQIndex", "RetrievalConfig", "build_index"]
