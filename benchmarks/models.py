"""``kvstore bench models``: every cache layout transformers 5.x builds, stored and continued.

For each architecture of :mod:`eval.architectures` (transformers' own model
classes, tiny random configs, CPU): extract the KV of a context, store it at the raw
level (``memory://``), load it back and generate from it. One row per architecture:

- ``supported`` (and ``error`` when not): whether its layout can be stored;
- ``raw_roundtrip_exact``: the loaded KV equals the extracted KV bit for bit (sliding
  layers: the tokens they hold; linear-attention layers: their states after the context);
- ``generate_matches``: greedy generation from the loaded KV equals generation from a
  fresh prefill (a model with linear-attention layers continues from the last stored
  chunk boundary before the context's end: its states cannot drop the last token);
- ``stored_bytes``: bytes of the context's chunk objects; ``full_layout_bytes``: the KV
  of every layer for every token at the same dtype, plus one copy of the linear layers'
  states (what a store without layer groups holds and reads); ``prefix_get_bytes``:
  bytes a ``get`` of the whole context reads to continue it; ``state_bytes``: one copy of
  the linear layers' states (0 without them; stored after every chunk here);
- ``profile_s``: seconds to calibrate the model's kvcodec profile (``None`` where
  per-model profiles do not cover the layout yet, with ``profile_error``).

``long_context`` stores a Gemma-3-style layout (6 layers, 5 of 6 sliding with window
512) at 8,192 tokens (4,096 with ``--quick``) and reports the bytes a prefix load reads
against the full layout.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import torch

from kvstore.errors import KVStoreError
from eval.architectures import ARCHS, tiny_model
from kvstore.integrations.hf import cache_layout, extract_kv, generate_greedy
from kvstore.integrations.hf_profile import profile_model
from kvstore.kv import KV, is_linear

CHUNK_TOKENS = 16
LONG_CHUNK_TOKENS = 256
LONG_WINDOW = 512


class _CountingReads:
    """Counts the bytes a store's ``get`` returns (installed on one store instance)."""

    def __init__(self, store: Any) -> None:
        self.bytes = 0
        self._get = store.get
        store.get = self.get

    async def get(self, key: str, *args: Any, **kwargs: Any) -> bytes | None:
        data = await self._get(key, *args, **kwargs)
        if data is not None and "/chunks/" in key:
            self.bytes += len(data)
        return data


async def _roundtrip(name: str, model: Any, ids: list[int], chunk_tokens: int, *,
                     generate: bool = True) -> dict[str, Any]:
    from kvstore import KVStore

    layout = cache_layout(model)
    kv = extract_kv(model, ids, chunk_tokens=1024, states_every=chunk_tokens if layout.has_linear else None)
    states = sum(t.numel() * t.element_size() for entry in kv if is_linear(entry) for t in entry.after(len(ids)))
    full = len(ids) * layout.bytes_per_token(kv[1 if is_linear(kv[0]) else 0][0].element_size()) + states
    async with KVStore("memory://", chunk_tokens=chunk_tokens) as store:
        manifest = await store.put(name, ids, kv, layout=layout)
        reads = _CountingReads(store.store)
        got: KV = await store.get(name, ids)
        row = {
            "layout": layout.describe(),
            "raw_roundtrip_exact": all(_same(entry, loaded, len(ids)) for entry, loaded in zip(kv, got, strict=True)),
            "stored_bytes": manifest.level_bytes(0),
            "full_layout_bytes": full,
            "prefix_get_bytes": reads.bytes,
            "prefix_get_vs_full": round(reads.bytes / full, 4),
            "state_bytes": states,
        }
        if generate:
            if layout.has_linear:  # continue from the last chunk boundary before the end
                got = await store.get(name, ids[:await store.lookup(name, ids[:-1])])
            row["generate_matches"] = (generate_greedy(model, ids, got, max_new_tokens=8)
                                       == generate_greedy(model, ids, None, max_new_tokens=8))
    return row


def _same(entry: Any, loaded: Any, n: int) -> bool:
    """Whether a loaded layer equals what was stored (the tokens it holds, or its states after ``n``)."""
    if is_linear(entry):
        return all(torch.equal(a, b) for a, b in zip(entry.after(n), loaded.after(n)))
    (k, v), (gk, gv) = entry, loaded
    return torch.equal(gk, k[:, k.shape[1] - gk.shape[1]:]) and torch.equal(gv, v[:, v.shape[1] - gv.shape[1]:])


def _profile_seconds(model: Any, ids: list[int]) -> tuple[float | None, str | None]:
    started = time.perf_counter()
    try:
        profile_model(model, [torch.tensor(ids)])
    except KVStoreError as exc:
        return None, str(exc)
    return round(time.perf_counter() - started, 3), None


def _arch_row(arch: str, tokens: int) -> dict[str, Any]:
    model = tiny_model(arch)
    ids = torch.randint(2, 500, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    row: dict[str, Any] = {"arch": arch, "model_class": type(model).__name__}
    try:
        row.update(asyncio.run(_roundtrip(arch, model, ids, CHUNK_TOKENS)))
    except KVStoreError as exc:
        row.update(supported=False, error=f"{type(exc).__name__}: {exc}")
        return row
    row["supported"] = row["raw_roundtrip_exact"] and row["generate_matches"]
    row["profile_s"], error = _profile_seconds(model, ids)
    if error is not None:
        row["profile_error"] = error
    return row


def run(quick: bool) -> dict[str, Any]:
    """Measure; ``quick`` takes well under a minute on two idle cores."""
    tokens = 96 if quick else 160
    rows = []
    for arch in ARCHS:
        row = _arch_row(arch, tokens)
        rows.append(row)
        print(f"{arch:12s} supported={row['supported']} {row.get('layout', row.get('error', ''))}", file=sys.stderr)
    long_tokens = 4096 if quick else 8192
    types = ["sliding_attention"] * 5 + ["full_attention"]
    model = tiny_model("gemma3", num_hidden_layers=6, layer_types=types, sliding_window=LONG_WINDOW,
                       max_position_embeddings=2 * long_tokens)
    ids = torch.randint(2, 500, (long_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    long = {"arch": "gemma3 (6 layers, 5 of 6 sliding, window 512)", "tokens": long_tokens,
            "chunk_tokens": LONG_CHUNK_TOKENS}
    long.update(asyncio.run(_roundtrip("gemma3-long", model, ids, LONG_CHUNK_TOKENS, generate=False)))
    print(f"long context: a prefix load reads {long['prefix_get_vs_full']:.3f} of the full layout", file=sys.stderr)
    return {
        "context_tokens": tokens,
        "chunk_tokens": CHUNK_TOKENS,
        "rows": rows,
        "supported": sum(bool(r["supported"]) for r in rows),
        "architectures": len(rows),
        "long_context": long,
    }
