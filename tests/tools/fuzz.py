"""A fuzz engine for every decoder of stored bytes (hostile input, issue #9).

Each *target* holds a few small, valid encoded objects (containers, manifests,
chunk objects of every codec, kvcodec profiles, rANS streams and frequency
tables, PQ objects) and the decoder a reader runs on them. A case mutates one
object and decodes it. Mutations:

* bytes: bit flips, interesting integers, truncation, extension, deletions,
  splices with other objects, and purely random bytes;
* behind the header checksum: the JSON header is parsed and a field set to a
  hostile value (huge, negative, wrong type, terabyte lengths, other dtypes and
  shapes), or bytes of the prefix and header text are damaged, and the header
  checksum is then recomputed ("resealed");
* behind the buffer checksums: a buffer is damaged, reinterpreted, reshaped,
  dropped or renamed and the object re-encoded, so the codec decoders, rANS
  streams and frequency tables inside a valid container are reached too.

A case ends as ``ok`` (decoded; an input whose checksummed bytes are unchanged
must decode to exactly the original values, anything else accepted must have
the declared shapes and types), ``rejected`` (a :class:`KVStoreError`) or
``unexpected``: any other exception, a wrong answer, a valid object rejected,
or a case that exceeds ``case_timeout_s``. Memory is capped while the cases run
(``RLIMIT_DATA``, ``memory_limit_mb`` above the current use), so a decoder that
believes a terabyte claim fails with ``MemoryError`` (counted as unexpected)
instead of taking the machine down. A crash of the interpreter itself is not
caught here: run ``python -m tests.tools.fuzz`` in a subprocess for that.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import copy
import functools
import inspect
import itertools
import json
import math
import os
import random
import resource
import signal
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

from kvstore.errors import KVStoreError
from kvstore.format import container
from kvstore.format.dtypes import DTYPES

MAX_EXAMPLES = 20
SLOW_CASE_S = 1.0
BIG_ALLOC_MB = 256

# -- hostile values -----------------------------------------------------------------------
INTERESTING_INTS = (
    0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 33, 48, 63, 64, 127, 128, 255, 256, 1023, 1024, 4095, 4096,
    65535, 65536, 2**20, 2**24, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**48, 2**63 - 1, 2**63, 2**64 - 1,
)
HOSTILE_JSON: tuple[Any, ...] = (
    0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 33, 64, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, 2**40,
    2**48, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 10**400, -(2**63), 1.5, -0.0, 1e308, float("inf"),
    float("nan"), "", "x", "float16", "bfloat16", "int8", "uint8", "int32", "uint32", "float32", "int64",
    "complex64", "../x", "/abs", "a" * 2000, None, True, False, [], {}, [0], [1, 2], [2**40], [-1], [[1]],
    [0, 2**62, 2**62], [0, 2**70], [2**32, 2**32], [1] * 9,
    {"name": "raw"}, {"name": "kvcodec", "params": {}},
)


def _hostile_like(rng: random.Random, value: Any) -> Any:
    """A replacement for ``value``: a value near it, or anything hostile."""
    if rng.random() < 0.5:
        if type(value) is int:
            return rng.choice([value + 1, value - 1, value + 64, value * 2, value // 2, -value, value << 32, 2**40])
        if isinstance(value, str) and value:
            chars = list(value)
            chars[rng.randrange(len(chars))] = chr(rng.choice([0, 0x2F, 0x2E, 0x41, 0xD800 - 1, 0x7F, 0xE9]))
            return "".join(chars)
        if isinstance(value, list) and value:
            op = rng.randrange(3)
            if op == 0:
                return value[:-1]
            if op == 1:
                return [*value, copy.deepcopy(value[-1])]
            return value[::-1]
    return copy.deepcopy(rng.choice(HOSTILE_JSON))


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            out.extend(_paths(child, (*path, key)))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            out.extend(_paths(child, (*path, i)))
    return out


def mutate_doc(rng: random.Random, doc: Any) -> Any:
    """A deep copy of the JSON document ``doc`` with one node replaced, deleted, duplicated or added."""
    doc = copy.deepcopy(doc)
    path = rng.choice(_paths(doc))
    if not path:
        return _hostile_like(rng, doc)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    key = path[-1]
    roll = rng.random()
    if roll < 0.08:
        del parent[key]
    elif roll < 0.14 and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    elif roll < 0.2 and isinstance(parent, dict):
        parent[rng.choice(["extra", "name", "offset", "nbytes", "params", "shape", "x"])] = _hostile_like(rng, 0)
    else:
        parent[key] = _hostile_like(rng, parent[key])
    return doc


# -- byte mutations -------------------------------------------------------------------------
def _flip(rng: random.Random, b: bytearray, lo: int = 0) -> None:
    if len(b) > lo:
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            i = rng.randrange(lo * 8, len(b) * 8)
            b[i >> 3] ^= 1 << (i & 7)


def _set_bytes(rng: random.Random, b: bytearray, lo: int = 0) -> None:
    if len(b) > lo:
        for _ in range(rng.choice((1, 1, 2, 4))):
            b[rng.randrange(lo, len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))


def _set_int(rng: random.Random, b: bytearray, lo: int = 0) -> None:
    width = rng.choice((1, 2, 4, 4, 8))
    if len(b) - lo < width:
        return _set_bytes(rng, b, lo)
    pos = rng.randrange(lo, len(b) - width + 1)
    if rng.random() < 0.6:
        pos -= (pos - lo) % width
    value = rng.choice(INTERESTING_INTS) + rng.choice((0, 0, 0, -1, 1))
    b[pos:pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def _resize(rng: random.Random, b: bytearray, lo: int = 0) -> bytearray:
    roll = rng.random()
    n = len(b)
    if roll < 0.35:  # truncate
        return b[: rng.randrange(n + 1)] if rng.random() < 0.5 else b[: max(0, n - rng.choice((1, 2, 4, 8, 64)))]
    if roll < 0.6:  # extend
        extra = bytes(rng.choice((1, 2, 8, 64))) if rng.random() < 0.5 else rng.randbytes(rng.choice((1, 7, 64)))
        return b + extra
    if roll < 0.8 and n > lo:  # delete a range
        i = rng.randrange(lo, n)
        return b[:i] + b[i + rng.choice((1, 2, 4, 16, 64)):]
    if n > lo:  # duplicate a range
        i = rng.randrange(lo, n)
        return b[:i] + b[i:i + rng.choice((1, 4, 64))] + b[i:]
    return b


def mutate_bytes(rng: random.Random, data: bytes, lo: int = 0) -> bytes:
    """``data`` after 1-3 byte-level mutations at or after offset ``lo``."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        roll = rng.random()
        if roll < 0.3:
            _flip(rng, b, lo)
        elif roll < 0.5:
            _set_bytes(rng, b, lo)
        elif roll < 0.75:
            _set_int(rng, b, lo)
        else:
            b = _resize(rng, b, lo)
    return bytes(b)


def random_bytes(rng: random.Random, like: bytes) -> bytes:
    """Random bytes, sometimes behind the first bytes of a real object (its magic)."""
    n = rng.choice((0, 1, 8, 23, 24, 25, 48, 64, 200, len(like)))
    body = rng.randbytes(n)
    keep = rng.choice((0, 0, 4, 8, 24))
    return like[:keep] + body[keep:]


# -- containers: reseal and rebuild ---------------------------------------------------------
def reseal(data: bytes | bytearray) -> bytes:
    """Recompute the header checksum of a (possibly damaged) container over the bytes its
    prefix claims, so that validation goes past the checksum."""
    b = bytearray(data)
    if len(b) >= container.PREFIX_BYTES:
        length = int.from_bytes(b[8:12], "little")
        if container.PREFIX_BYTES + length <= len(b):
            digest = xxhash.xxh3_64(bytes(b[:16]))
            digest.update(bytes(b[24:24 + length]))
            b[16:24] = digest.intdigest().to_bytes(8, "little")
    return bytes(b)


def seal(header: bytes, data_section: bytes, *, version: int = container.VERSION) -> bytes:
    """A container of raw ``header`` text and ``data_section``, with a valid header checksum."""
    prefix = struct.pack("<4sHHII", container.MAGIC, version, 0, len(header), 0)
    digest = xxhash.xxh3_64(prefix)
    digest.update(header)
    pad = -(container.PREFIX_BYTES + len(header)) % container.ALIGN
    return prefix + digest.intdigest().to_bytes(8, "little") + header + bytes(pad) + data_section


@dataclass
class Parts:
    """A valid container taken apart: its header document, data section and buffers."""

    doc: dict[str, Any]
    data_section: bytes
    buffers: dict[str, tuple[str, tuple[int, ...], bytes]]


def split(data: bytes) -> Parts:
    obj = container.decode(data)
    h = obj.header
    start = h.data_start
    doc = json.loads(bytes(data[container.PREFIX_BYTES:container.PREFIX_BYTES + h.header_bytes]))
    buffers = {n: (s.dtype, s.shape, bytes(obj.raw(n))) for n, s in h.buffers.items()}
    return Parts(doc, bytes(data[start:]), buffers)


def _tensor(dtype: str, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    tdt, size = DTYPES[dtype]
    if len(raw) % size:
        tdt, size = torch.uint8, 1
    if math.prod(shape) * size != len(raw):
        shape = (len(raw) // size,)
    if not raw:
        return torch.empty(shape, dtype=tdt)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(tdt).reshape(shape)


def rebuild(doc: dict[str, Any], buffers: dict[str, tuple[str, tuple[int, ...], bytes]]) -> bytes:
    """Re-encode a container (fresh checksums) from a header document's kind/codec/meta and buffers."""
    return container.encode(
        {n: _tensor(*b) for n, b in buffers.items()}, kind=doc["kind"], codec=doc["codec"], meta=doc["meta"]
    )


def mutate_buffers(rng: random.Random, parts: Parts) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """The buffers with one of them damaged, reinterpreted, reshaped, dropped, renamed or swapped."""
    bufs = dict(parts.buffers)
    if not bufs:
        return {"x": ("uint8", (3,), b"abc")}
    name = rng.choice(list(bufs))
    dtype, shape, raw = bufs[name]
    roll = rng.random()
    if roll < 0.45:
        if raw[:4] == b"KVRA" and rng.random() < 0.7:
            new = mutate_rans(rng, raw)
        elif raw[:4] == b"KVFT" and rng.random() < 0.5:
            new = mutate_bytes(rng, raw, 16) if rng.random() < 0.7 else mutate_bytes(rng, raw)
        else:
            new = mutate_bytes(rng, raw)
        bufs[name] = (dtype, shape, new) if len(new) == len(raw) else ("uint8", (len(new),), new)
    elif roll < 0.6:
        bufs[name] = (rng.choice(list(DTYPES)), shape, raw)
    elif roll < 0.7:
        dims = list(shape)
        op = rng.randrange(4)
        if op == 0:
            dims = [math.prod(dims)]
        elif op == 1:
            dims = [1, *dims]
        elif op == 2 and len(dims) >= 2:
            dims[0], dims[1] = dims[1], dims[0]
        elif dims:
            dims = dims[:-2] + [math.prod(dims[-2:])]
        bufs[name] = (dtype, tuple(dims), raw)
    elif roll < 0.78:
        del bufs[name]
    elif roll < 0.84:
        bufs[name + rng.choice(("_", "x", "2"))] = bufs.pop(name)
    elif roll < 0.92 and len(bufs) > 1:
        other = rng.choice([n for n in bufs if n != name])
        bufs[name], bufs[other] = bufs[other], bufs[name]
    else:
        fill = rng.choice((b"\x00", b"\xff", b"\x7f"))
        bufs[name] = (dtype, shape, fill * len(raw))
    return bufs


# -- rANS stream mutations ------------------------------------------------------------------
_RANS_FIELDS = struct.Struct("<4sBBBBIIIIHHIIIII")
_RANS_SIZES = (4, 1, 1, 1, 1, 4, 4, 4, 4, 2, 2, 4, 4, 4, 4, 4)


def mutate_rans(rng: random.Random, stream: bytes) -> bytes:
    """A rANS stream with a header field edited, or damage behind its header (valid framing)."""
    if len(stream) < _RANS_FIELDS.size or rng.random() < 0.15:
        return mutate_bytes(rng, stream)
    roll = rng.random()
    if roll < 0.35:
        fields = list(_RANS_FIELDS.unpack_from(stream))
        i = rng.randrange(1, len(fields))
        bits = 8 * _RANS_SIZES[i]
        value = rng.choice((*INTERESTING_INTS, fields[i] + 1, fields[i] - 1, fields[i] * 2, fields[i] // 2))
        fields[i] = value % (1 << bits)
        return _RANS_FIELDS.pack(*fields) + stream[_RANS_FIELDS.size:]
    if roll < 0.8:
        b = bytearray(stream)
        rng.choice((_flip, _set_bytes, _set_int))(rng, b, _RANS_FIELDS.size)
        return bytes(b)
    # swap two 16-bit words or two 32-bit states/offsets: counts stay plausible
    b = bytearray(stream)
    width = rng.choice((2, 4))
    n = (len(b) - _RANS_FIELDS.size) // width
    if n >= 2:
        i, j = (_RANS_FIELDS.size + width * rng.randrange(n) for _ in range(2))
        b[i:i + width], b[j:j + width] = b[j:j + width], b[i:i + width]
    return bytes(b)


# -- the engine ----------------------------------------------------------------------------
@dataclass
class Seed:
    """One valid object of a target: its bytes, what its decoder returns, and context."""

    data: bytes
    expected: Any = None
    extra: Any = None
    parts: Parts | None = None


@dataclass
class Case:
    """One input to decode: ``exact`` when every checksummed byte is as in the seed (so success
    must return the seed's values)."""

    data: bytes
    exact: bool
    op: str
    aux: Any = None


Mutator = Callable[[random.Random, Seed, "Target"], Case]


@dataclass
class Target:
    """A decoder, its valid seeds and the mutations used on them."""

    name: str
    seeds: list[Seed]
    decode: Callable[[Case, Seed], Any]
    same: Callable[[Any, Any], bool]
    sane: Callable[[Any, Seed], bool]
    mutators: list[tuple[float, Mutator]]
    weight: float = 1.0
    cumulative: list[float] = field(default_factory=list)

    def pick(self, rng: random.Random) -> Mutator:
        """A mutator, drawn by weight."""
        if not self.cumulative:
            self.cumulative = list(itertools.accumulate(w for w, _ in self.mutators))
        i = bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1])
        return self.mutators[min(i, len(self.mutators) - 1)][1]


def _m_bytes(exact: bool) -> Mutator:
    def fn(rng: random.Random, seed: Seed, target: Target) -> Case:
        return Case(mutate_bytes(rng, seed.data), exact, "bytes")
    return fn


def _m_random(rng: random.Random, seed: Seed, target: Target) -> Case:
    return Case(random_bytes(rng, seed.data), False, "random")


def _m_splice(rng: random.Random, seed: Seed, target: Target) -> Case:
    other = rng.choice(target.seeds).data
    i, j = rng.randrange(len(seed.data) + 1), rng.randrange(len(other) + 1)
    return Case(seed.data[:i] + other[j:], False, "splice")


def _m_reseal_bytes(rng: random.Random, seed: Seed, target: Target) -> Case:
    """Damage the prefix or header text (or anything), then fix the header checksum."""
    head = container.PREFIX_BYTES + int.from_bytes(seed.data[8:12], "little")
    b = bytearray(seed.data)
    if rng.random() < 0.8:
        cut = bytearray(b[:head])
        cut = bytearray(mutate_bytes(rng, bytes(cut), 0))
        if len(cut) != head and rng.random() < 0.7:  # keep the length field consistent with the text
            cut[8:12] = max(0, len(cut) - container.PREFIX_BYTES).to_bytes(4, "little")
        b = cut + b[head:]
    else:
        b = bytearray(mutate_bytes(rng, bytes(b)))
    return Case(reseal(b), False, "reseal-bytes")


_JSON_TRICKS = (
    lambda t: t.replace(b"0", b"1" * 5000, 1),  # an integer beyond Python's digit limit
    lambda t: b"[" * 100_000 + b"]" * 100_000,  # nesting beyond the recursion limit
    lambda t: b"{" * 50 + t,
    lambda t: t.replace(b"}", b',"x":NaN}', 1),
    lambda t: t.replace(b"}", b',"x":1e999}', 1),
    lambda t: t.replace(b'"', b'"\\ud800', 1),
    lambda t: t + b"\xff",
    lambda t: b"\xef\xbb\xbf" + t,
    lambda t: t.replace(b"{", b'{"kind":"dup",', 1),
    lambda t: t.replace(b'"', b"'"),
    lambda t: t[: len(t) // 2],
    lambda t: t.replace(b",", b", " * 4, 3),
)


def _m_reseal_doc(rng: random.Random, seed: Seed, target: Target) -> Case:
    """Set one header field to a hostile value (or damage the JSON text) and reseal."""
    parts = seed.parts
    assert parts is not None
    if rng.random() < 0.85:
        text = json.dumps(mutate_doc(rng, parts.doc), separators=(",", ":")).encode()
    else:
        text = rng.choice(_JSON_TRICKS)(json.dumps(parts.doc, separators=(",", ":")).encode())
    data = seal(text, parts.data_section)
    if rng.random() < 0.1:
        data = data + bytes(rng.choice((1, 64)))
    return Case(data, False, "reseal-doc")


def _m_rebuild(rng: random.Random, seed: Seed, target: Target) -> Case:
    """Damage, reinterpret, reshape, drop or rename a buffer; re-encode with fresh checksums."""
    parts = seed.parts
    assert parts is not None
    return Case(rebuild(parts.doc, mutate_buffers(rng, parts)), False, "rebuild")


def container_mutators() -> list[tuple[float, Mutator]]:
    """The mix for checksummed containers: a third stopped by checksums, the rest behind them."""
    return [(3, _m_bytes(True)), (1, _m_random), (0.5, _m_splice), (2, _m_reseal_bytes),
            (2.5, _m_reseal_doc), (3, _m_rebuild)]


@dataclass
class Stats:
    """Per-target counts."""

    cases: int = 0
    ok: int = 0
    rejected: int = 0
    unexpected: int = 0


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that ran past its time limit."""


class WrongAnswer(Exception):
    """A decoder accepted an input and returned values it should not have."""


def _data_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(target: Target, seed: Seed, case: Case) -> tuple[str, str]:
    """Decode one case: ``("ok" | "rejected" | "unexpected", detail)``. Time limits are the caller's."""
    try:
        out = target.decode(case, seed)
    except KVStoreError as exc:
        if case.data == seed.data and case.aux is None:
            return "unexpected", f"valid object rejected: {exc!r}"
        return "rejected", ""
    except Exception as exc:  # noqa: BLE001 - anything else is what we are looking for
        return "unexpected", f"{type(exc).__name__}: {exc}"[:400]
    try:
        if case.exact or (case.data == seed.data and case.aux is None):
            good = target.same(out, seed.expected)
            what = "wrong answer: a mutated object passed every check but decoded to other values"
        else:
            good = target.sane(out, seed)
            what = "malformed result accepted"
    except Exception as exc:  # noqa: BLE001
        good, what = False, f"result check failed: {type(exc).__name__}: {exc}"
    return ("ok", "") if good else ("unexpected", what)


def run_fuzz(
    cases: int,
    seed: int = 0,
    time_budget_s: float | None = None,
    *,
    targets: list[str] | None = None,
    case_timeout_s: float = 5.0,
    memory_limit_mb: int | None = 1024,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run ``cases`` fuzz cases (or until ``time_budget_s``) over every target (or ``targets``).

    ``device``: where chunk objects are decoded (``cuda`` reaches the GPU decoders; the
    memory cap then covers host memory only).

    Returns ``fuzz_cases``, ``fuzz_unexpected_exceptions``, ``per_target`` (cases, ok,
    rejected, unexpected per target), ``per_mutation`` (the same per target and mutation
    kind), ``slow_cases`` (how many took over 1 s; ``slow_examples``), ``memory_cases`` (the
    peak RSS grew by more than 256 MiB during the case; ``memory_examples``),
    ``examples`` (up to 20 unexpected outcomes: target, mutation, error, input size and
    hex prefix), ``peak_rss_growth_mb`` and ``seconds`` (setup included).
    """
    started = time.perf_counter()
    rng = random.Random(seed)
    env = Environment(device)
    try:
        all_targets = build_targets(env)
        chosen = [t for t in all_targets if targets is None or t.name in targets]
        if not chosen:
            raise ValueError(f"no such targets {targets}; have {[t.name for t in all_targets]}")
        weights = list(itertools.accumulate(t.weight for t in chosen))
        stats = {t.name: Stats() for t in chosen}
        by_op: dict[str, Stats] = {}
        mutator_errors = 0
        examples: list[dict[str, Any]] = []
        slow: list[dict[str, Any]] = []
        memory: list[dict[str, Any]] = []
        n_slow = n_memory = 0
        rss0 = _rss_mb()
        with _limits(case_timeout_s, memory_limit_mb) as alarm:
            done = 0
            while done < cases:
                if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                    break
                target = chosen[min(bisect.bisect(weights, rng.random() * weights[-1]), len(chosen) - 1)]
                s = rng.choice(target.seeds)
                try:
                    case = target.pick(rng)(rng, s, target)
                except Exception:  # noqa: BLE001 - e.g. a re-encode refused the mutated buffers
                    mutator_errors += 1
                    continue
                done += 1
                before = _rss_mb()
                t0 = time.perf_counter()
                try:
                    alarm(True)
                    outcome, detail = run_case(target, s, case)
                except CaseTimeout:
                    outcome, detail = "unexpected", f"no result within {case_timeout_s} s (hang)"
                    env.reset_after_timeout()
                finally:
                    alarm(False)
                elapsed = time.perf_counter() - t0
                grown = _rss_mb() - before
                for st in (stats[target.name], by_op.setdefault(f"{target.name}:{case.op}", Stats())):
                    st.cases += 1
                    setattr(st, outcome, getattr(st, outcome) + 1)
                record = {"target": target.name, "mutation": case.op, "seconds": round(elapsed, 3),
                          "size": len(case.data), "input_hex": case.data[:64].hex()}
                if elapsed > SLOW_CASE_S:
                    n_slow += 1
                    if len(slow) < MAX_EXAMPLES:
                        slow.append(record)
                if grown > BIG_ALLOC_MB:
                    n_memory += 1
                    if len(memory) < MAX_EXAMPLES:
                        memory.append({**record, "rss_growth_mb": round(grown)})
                if outcome == "unexpected" and len(examples) < MAX_EXAMPLES:
                    examples.append({**record, "error": detail})
    finally:
        env.close()
    return {
        "fuzz_cases": sum(s.cases for s in stats.values()),
        "fuzz_unexpected_exceptions": sum(s.unexpected for s in stats.values()),
        "per_target": {name: vars(s) for name, s in stats.items()},
        "per_mutation": {name: vars(s) for name, s in sorted(by_op.items())},
        "mutations_not_built": mutator_errors,
        "slow_cases": n_slow,
        "slow_examples": slow,
        "memory_cases": n_memory,
        "memory_examples": memory,
        "peak_rss_growth_mb": round(_rss_mb() - rss0, 1),
        "examples": examples,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
    }


class _limits:
    """Per-case alarm (main thread only) and a soft cap on the data segment, restored on exit."""

    def __init__(self, timeout_s: float, memory_limit_mb: int | None) -> None:
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.use_alarm = threading.current_thread() is threading.main_thread() and timeout_s > 0
        self.old_handler: Any = None
        self.old_rlimit: tuple[int, int] | None = None

    def __enter__(self) -> Callable[[bool], None]:
        if self.use_alarm:
            self.old_handler = signal.signal(signal.SIGALRM, _on_alarm)
        used = _data_kb()
        if self.memory_limit_mb and used is not None:
            try:
                self.old_rlimit = resource.getrlimit(resource.RLIMIT_DATA)
                soft = used * 1024 + self.memory_limit_mb * (1 << 20)
                hard = self.old_rlimit[1]
                if hard == resource.RLIM_INFINITY or soft <= hard:
                    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
                else:
                    self.old_rlimit = None
            except (OSError, ValueError):
                self.old_rlimit = None
        return self.alarm

    def alarm(self, on: bool) -> None:
        if self.use_alarm:
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s if on else 0)

    def __exit__(self, *exc: object) -> None:
        if self.use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old_handler)
        if self.old_rlimit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, self.old_rlimit)


def _on_alarm(signum: int, frame: object) -> None:
    raise CaseTimeout()


# -- the targets ----------------------------------------------------------------------------
MODEL = "fuzz/model"


class Environment:
    """What the targets share: a scratch directory and the event loop of the async readers."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)  # where chunk objects are decoded
        self.tmp = tempfile.TemporaryDirectory(prefix="kvstore-fuzz-")
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def reset_after_timeout(self) -> None:
        """A timeout inside the event loop may leave it half-run: start a fresh one."""
        try:
            self.loop.close()
        except Exception:  # noqa: BLE001 - a loop interrupted mid-run may refuse to close
            pass
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()
        finally:
            self.tmp.cleanup()


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    size = t.element_size()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])


def same_tensors(a: Any, b: Any) -> bool:
    """Bit-exact equality of two tensors or sequences of tensors (NaN equals itself)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.equal(_bits(a), _bits(b))))
    return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))


def _kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(shape, generator=g) * 2 + torch.linspace(-1, 1, shape[-1])
    values = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g).add(0.1)
    return keys.to(dtype), values.to(dtype)


# container ---------------------------------------------------------------------------------
def _decode_container(case: Case, seed: Seed) -> Any:
    data = case.data
    obj = container.decode(data)
    h = obj.header
    raws = {n: bytes(obj.raw(n)) for n in h.buffers}
    tensors = {n: obj.tensor(n) for n in h.buffers}
    head = container.decode_header(memoryview(data)[: container.head_bytes_needed(data)], len(data))
    for n, spec in head.buffers.items():  # the ranged-read path
        start, stop = head.buffer_range(n)
        container.verified(spec, data[start:stop])
    return h, raws, tensors


def _same_container(out: Any, expected: Any) -> bool:
    (h1, r1, t1), (h2, r2, t2) = out, expected
    return (h1 == h2 and r1 == r2 and t1.keys() == t2.keys()
            and all(same_tensors(t1[n], t2[n]) for n in t1))


def _sane_container(out: Any, seed: Seed) -> bool:
    h, raws, tensors = out
    for n, spec in h.buffers.items():
        dtype, size = DTYPES[spec.dtype]
        t = tensors[n]
        if len(raws[n]) != spec.nbytes or t.dtype != dtype or tuple(t.shape) != spec.shape:
            return False
        if math.prod(spec.shape) * size != spec.nbytes or spec.offset + spec.nbytes > h.data_bytes:
            return False
    return True


def _container_target() -> Target:
    objects = [
        container.encode({}, kind="empty"),
        container.encode(
            {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": torch.linspace(-2, 2, 15).reshape(3, 5).half(),
             "c": b"xyz", "z": np.zeros((0, 4), np.float32), "s": torch.tensor(1.5, dtype=torch.bfloat16)},
            kind="mixed", codec={"name": "raw", "params": {}}, meta={"x": [1, 2, {"y": "z"}], "n": 3},
        ),
        container.encode(
            {"u16": torch.tensor([1, 65535], dtype=torch.uint16), "u32": torch.tensor([7], dtype=torch.uint32),
             "i64": torch.tensor([[-1, 2**40]]), "i16": torch.tensor([-5], dtype=torch.int16),
             "i8": torch.tensor([-128, 127], dtype=torch.int8), "f32": torch.tensor([float("inf"), 0.5])},
            kind="ints", meta={"k": "v"},
        ),
    ]
    seeds = []
    for data in objects:
        seed = Seed(data, extra=None, parts=split(data))
        seed.expected = _decode_container(Case(data, True, "seed"), seed)
        seeds.append(seed)
    return Target("container", seeds, _decode_container, _same_container, _sane_container, container_mutators())


# chunk objects of every codec ------------------------------------------------------------------
def _decode_chunk(case: Case, seed: Seed) -> Any:
    from kvstore.format.chunk import decode_chunk

    ident, device = seed.extra
    return decode_chunk(case.data, ident, device)


def _sane_chunk(out: Any, seed: Seed) -> bool:
    ident, device = seed.extra
    return len(out) == 2 and all(
        isinstance(t, torch.Tensor) and tuple(t.shape) == ident.shape and t.dtype == ident.dtype
        and t.device.type == device.type for t in out
    )


def _chunk_target(name: str, codec: Any, specs: list[tuple[tuple[int, int, int, int], torch.dtype, int]],
                  device: torch.device, tweak: Callable[[torch.Tensor], None] | None = None) -> Target:
    from kvstore.format.chunk import ChunkIdentity, encode_chunk
    from kvstore.format.keys import chunk_hashes, model_fingerprint

    fp = model_fingerprint(MODEL)
    seeds = []
    for i, (shape, dtype, start) in enumerate(specs):
        layers, heads, tokens, dim = shape
        ids = np.arange(100 + start, 100 + start + tokens, dtype=np.int32)
        ident = ChunkIdentity(fp, chunk_hashes(fp, ids, tokens)[0], start, ids, layers, heads, dim, dtype)
        keys, values = _kv(shape, dtype, i)
        if tweak is not None:
            tweak(keys)
        data = encode_chunk(codec, ident, keys, values)
        seed = Seed(data, extra=(ident, device), parts=split(data))
        seed.expected = _decode_chunk(Case(data, True, "seed"), seed)
        seeds.append(seed)
    return Target(f"chunk_{name}", seeds, _decode_chunk, same_tensors, _sane_chunk, container_mutators())


@functools.cache
def _kvcodec_profile() -> Any:
    """A tiny kvcodec profile (2 layers x 1 head x 8 dims), shared by two targets."""
    from kvstore.codecs.kvcodec_profile import build_profile

    samples = [_kv((2, 1, 48, 8), torch.float32, 100 + i) for i in range(2)]
    energy = torch.linspace(0.5, 4.0, 16).reshape(2, 1, 8)
    return build_profile(samples, query_energy=energy)


def _chunk_targets(device: torch.device) -> list[Target]:
    from kvstore.codecs.base import get_codec
    from kvstore.codecs.kvcodec import KVCodec

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    small = [((2, 2, 5, 8), f16, 0), ((1, 2, 3, 4), bf16, 7), ((2, 1, 4, 8), f32, 3)]

    def outlier(keys: torch.Tensor) -> None:
        keys[0, 0, 6, 3] = 3000.0  # beyond kvcodec's symbol range: stored as a patch

    return [
        _chunk_target("raw", get_codec("raw"), small, device),
        _chunk_target("int8", get_codec("int8"), small, device),
        _chunk_target("kivi2", get_codec("kivi2", {"bits": 2, "group_size": 4}), small[:2], device),
        _chunk_target("kivi3", get_codec("kivi2", {"bits": 3, "group_size": 3}), small[:2], device),
        _chunk_target("cachegen_ref", get_codec("cachegen_ref"), [((3, 2, 6, 8), f16, 0), ((2, 1, 5, 4), f32, 9)],
                      device),
        _chunk_target("cachegen_ref8", get_codec("cachegen_ref", {"bins": 8, "precision": 10}),
                      [((2, 2, 4, 4), f16, 0)], device),
        _chunk_target("kvcodec", KVCodec(_kvcodec_profile(), 1), [((2, 1, 12, 8), f16, 0), ((2, 1, 9, 8), f32, 100)],
                      device, tweak=outlier),
    ]


# kvcodec profile ---------------------------------------------------------------------------
def _decode_profile(case: Case, seed: Seed) -> Any:
    from kvstore.codecs.kvcodec import KVCodec

    return KVCodec.parse_profile(case.data)


def _same_profile(a: Any, b: Any) -> bool:
    return (a.shape == b.shape and a.sink_tokens == b.sink_tokens and a.levels == b.levels
            and same_tensors([a.key_center, a.key_unit], [b.key_center, b.key_unit]) and a.tables == b.tables)


def _sane_profile(out: Any, seed: Seed) -> bool:
    layers, heads, dim = out.shape
    return (tuple(out.key_center.shape) == (layers, heads, dim) and len(out.tables) == len(out.levels)
            and all(t.keys.num_models == layers * heads * dim for t in out.tables))


def _profile_target() -> Target:
    data = _kvcodec_profile().to_bytes()
    seed = Seed(data, parts=split(data))
    seed.expected = _decode_profile(Case(data, True, "seed"), seed)
    return Target("kvcodec_profile", [seed], _decode_profile, _same_profile, _sane_profile,
                  container_mutators(), weight=0.5)


# manifests and PQ objects, written by a real KVStore -------------------------------------------
@dataclass
class _StoreFixture:
    kvstore: Any
    tokens: np.ndarray
    manifest_key: str
    pq: list[tuple[Any, Any]]  # (config, PQObjects)


def _store_fixture(env: Environment) -> _StoreFixture:
    from kvstore.backends.memory import MemoryStore
    from kvstore.format.keys import chunk_hashes, model_fingerprint
    from kvstore.retrieval import pq
    from kvstore.retrieval.store import put_pq
    from kvstore.store import KVStore

    kvs = KVStore(MemoryStore(), chunk_tokens=8, levels=("raw", ("kivi2", {"bits": 2, "group_size": 4})),
                  namespace="fuzz")
    tokens = np.arange(1, 21, dtype=np.int32)
    g = torch.Generator().manual_seed(5)
    kv = [(torch.randn(2, 20, 8, generator=g).half(), torch.randn(2, 20, 8, generator=g).half()) for _ in range(2)]
    env.run(kvs.put(MODEL, tokens, kv))
    fp = model_fingerprint(MODEL)
    manifest_key = kvs.keys.manifest_key(fp, chunk_hashes(fp, tokens, 8)[-1])
    written = []
    for config, option in zip(
        (pq.PQConfig(subspaces=2, bits=3, sinks=0, iters=2), pq.PQConfig(subspaces=4, bits=2, sinks=2, iters=2),
         pq.PQConfig(subspaces=2, bits=2, sinks=1, iters=2, layout="contiguous")),
        _centroid_options(put_pq),
    ):
        index = pq.build_index([k.float() for k, _ in kv], config)
        written.append((config, env.run(put_pq(kvs, MODEL, tokens, index, **option))))
    return _StoreFixture(kvs, tokens, manifest_key, written)


def _centroid_options(put_pq: Callable[..., Any]) -> list[dict[str, str]]:
    """A few ways of storing centroids, whichever ``put_pq`` offers."""
    params = inspect.signature(put_pq).parameters
    if "centroid_format" in params:
        from kvstore.retrieval import centroid_storage

        formats = [f for f in ("q4", "float16", "int8", "q3") if f in centroid_storage.FORMATS]
        return [{"centroid_format": f} for f in formats[:3]]
    if "centroid_dtype" in params:
        return [{"centroid_dtype": d} for d in ("int8", "float16")]
    return [{}]


def _decode_manifest(case: Case, seed: Seed) -> Any:
    from kvstore.format.manifest import from_bytes

    return from_bytes(case.data)


def _same_manifest(a: Any, b: Any) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[1].dtype == b[1].dtype


def _sane_manifest(out: Any, seed: Seed) -> bool:
    manifest, tokens = out
    return (tokens.shape == (manifest.num_tokens,) and tokens.dtype == np.dtype("<i4")
            and len(manifest.chunks) == -(-manifest.num_tokens // manifest.chunk_tokens)
            and all(len(c.objects) == len(manifest.levels) for c in manifest.chunks))


def _manifest_target(fx: _StoreFixture, env: Environment) -> Target:
    data = env.run(fx.kvstore.store.get(fx.manifest_key))
    seed = Seed(data, parts=split(data))
    seed.expected = _decode_manifest(Case(data, True, "seed"), seed)
    return Target("manifest", [seed], _decode_manifest, _same_manifest, _sane_manifest, container_mutators())


@dataclass(frozen=True)
class _PQObject:
    """A PQ object's place: its key, the configuration and token span it belongs to, and the
    centroids object that lists it."""

    key: str
    config: Any
    shape: tuple[int, int, int]  # layers, kv_heads, tokens of the whole context
    centroids_key: str
    centroids: Parts


def _pq_decoder(fx: _StoreFixture, env: Environment) -> Callable[[Case, Seed], Any]:
    from kvstore.retrieval.store import get_pq

    store = fx.kvstore.store

    def decode(case: Case, seed: Seed) -> Any:
        where: _PQObject = seed.extra
        overrides = {where.key: case.data, **(case.aux or {})}
        originals = {k: env.run(store.get(k)) for k in overrides}
        try:
            for k, v in overrides.items():
                env.run(store.put(k, v))
            return env.run(get_pq(fx.kvstore, MODEL, fx.tokens, where.config))
        finally:
            for k, v in originals.items():
                env.run(store.put(k, v))

    return decode


def _same_pq(a: Any, b: Any) -> bool:
    return a.config == b.config and same_tensors([a.centroids, a.codes], [b.centroids, b.codes])


def _sane_pq(out: Any, seed: Seed) -> bool:
    config = seed.extra.config
    layers, heads, tokens = seed.extra.shape
    return (tuple(out.codes.shape) == (layers, heads, tokens, config.subspaces) and out.codes.dtype == torch.uint8
            and out.centroids.shape[:4] == (layers, heads, config.subspaces, config.centroids))


def _m_relisted(rng: random.Random, seed: Seed, target: Target) -> Case:
    """Rebuild a codes object and list it in its (re-encoded) centroids object, so that the
    codes object's own checks are reached."""
    where: _PQObject = seed.extra
    parts = seed.parts
    assert parts is not None
    if rng.random() < 0.6:
        data = rebuild(parts.doc, mutate_buffers(rng, parts))
    else:
        data = seal(json.dumps(mutate_doc(rng, parts.doc)).encode(), parts.data_section)
    try:
        head = container.decode_header(memoryview(data)[: container.head_bytes_needed(data)], len(data))
    except KVStoreError:
        return Case(data, False, "pq-relisted")
    doc = copy.deepcopy(where.centroids.doc)
    for item in doc["meta"]["codes"]:
        if item[0] == where.key:
            item[1:] = [len(data), container.PREFIX_BYTES + head.header_bytes, head.checksum]
    return Case(data, False, "pq-relisted", aux={where.centroids_key: rebuild(doc, where.centroids.buffers)})


def _pq_targets(fx: _StoreFixture, env: Environment) -> list[Target]:
    from kvstore.retrieval.store import get_pq

    decode = _pq_decoder(fx, env)
    centroid_seeds, code_seeds = [], []
    for config, objects in fx.pq:
        index = env.run(get_pq(fx.kvstore, MODEL, fx.tokens, config))
        shape = tuple(index.codes.shape[:3])
        ckey = objects.centroids.key
        cdata = env.run(fx.kvstore.store.get(ckey))
        cparts = split(cdata)
        centroid_seeds.append(Seed(cdata, index, _PQObject(ckey, config, shape, ckey, cparts), cparts))
        for obj in objects.codes:
            data = env.run(fx.kvstore.store.get(obj.key))
            code_seeds.append(Seed(data, index, _PQObject(obj.key, config, shape, ckey, cparts), split(data)))
    return [
        Target("pq_centroids", centroid_seeds, decode, _same_pq, _sane_pq, container_mutators(), weight=0.7),
        Target("pq_codes", code_seeds, decode, _same_pq, _sane_pq, [*container_mutators(), (3, _m_relisted)],
               weight=0.7),
    ]


# rANS streams and frequency tables ----------------------------------------------------------
def _decode_rans(case: Case, seed: Seed) -> Any:
    from kvstore.codecs import rans

    table, model_map, shape, pass_shape = seed.extra
    if pass_shape:
        return rans.decode(case.data, table, model_map, shape=shape)
    return rans.decode(case.data, table, model_map, max_symbols=4 * math.prod(shape) + 4096)


def _same_array(a: Any, b: Any) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


def _sane_rans(out: Any, seed: Seed) -> bool:
    from kvstore.codecs.symbol_model import canonical_layout

    table, model_map, shape, pass_shape = seed.extra
    if out.dtype != np.uint8 or (pass_shape and out.shape != tuple(shape)):
        return False
    (B, T, C), mm = canonical_layout(out.shape, model_map)
    if out.size == 0:
        return True
    models = mm.reshape(B, 1, C).repeat(T, axis=1).reshape(-1)
    sym = out.reshape(-1).astype(np.int64)
    return bool((sym < table.alphabet).all()) and bool((table.freqs[models, sym] > 0).all())


def _rans_streams() -> list[tuple[bytes, Any, Any, tuple[int, ...]]]:
    from kvstore.codecs import rans
    from kvstore.codecs.symbol_model import FrequencyTable, count_symbols

    rng = np.random.default_rng(3)
    out = []
    specs = [  # (shape, models per (B, C) or None, alphabet, precision, min_freq, group size)
        ((300,), None, 16, 14, 1, None),
        ((40, 6), "c", 5, 12, 0, 64),
        ((2, 33, 3), "bc", 256, 16, 1, 32),
        ((2, 17, 4), "bc", 3, 8, 0, 32),
        ((64,), None, 2, 15, 0, None),
        ((0,), None, 4, 10, 1, None),
    ]
    for shape, maps, alphabet, precision, min_freq, group in specs:
        probs = rng.dirichlet(np.full(alphabet, 0.3))
        sym = rng.choice(alphabet, size=shape, p=probs).astype(np.uint8)
        if maps is None:
            model_map, num_models = None, 1
        elif maps == "c":
            model_map = np.arange(shape[1]) % 3
            num_models = 3
        else:
            model_map = np.arange(shape[0] * shape[2]).reshape(shape[0], shape[2])
            num_models = model_map.size
        counts = count_symbols(sym, model_map, num_models, alphabet)
        table = FrequencyTable.from_counts(counts, precision, min_freq=min_freq)
        out.append((rans.encode(sym, table, model_map, group_size=group), table, model_map, shape))
    # a symbol of probability one: a stream of many symbols and no words
    table = FrequencyTable(np.array([[0, 1 << 12, 0]]), 12)
    out.append((rans.encode(np.ones(500, np.uint8), table), table, None, (500,)))
    return out


def _m_rans(rng: random.Random, seed: Seed, target: Target) -> Case:
    return Case(mutate_rans(rng, seed.data), False, "rans")


def _rans_target() -> Target:
    from kvstore.codecs import rans

    seeds = []
    for data, table, model_map, shape in _rans_streams():
        expected = rans.decode(data, table, model_map)
        for pass_shape in (True, False):
            seeds.append(Seed(data, expected, (table, model_map, shape, pass_shape)))
    mutators = [(2, _m_bytes(False)), (5, _m_rans), (1, _m_random), (0.5, _m_splice)]
    return Target("rans", seeds, _decode_rans, _same_array, _sane_rans, mutators, weight=2.0)


def _decode_table(case: Case, seed: Seed) -> Any:
    from kvstore.codecs.symbol_model import FrequencyTable

    table = FrequencyTable.from_bytes(case.data)
    table._decode_entries  # noqa: B018 - the decoder's lookups are built from stored tables too
    return table


def _sane_table(out: Any, seed: Seed) -> bool:
    f = out.freqs.astype(np.int64)
    return f.ndim == 2 and bool((f.sum(axis=1) == 1 << out.precision).all())


def _table_target() -> Target:
    seeds = []
    for _, table, _, _ in _rans_streams():
        data = table.to_bytes()
        seeds.append(Seed(data, table))

    def m_body(rng: random.Random, seed: Seed, target: Target) -> Case:
        return Case(mutate_bytes(rng, seed.data, 16), False, "table-body")

    mutators = [(3, _m_bytes(False)), (3, m_body), (1, _m_random), (0.5, _m_splice)]
    return Target("freq_table", seeds, _decode_table, lambda a, b: a == b, _sane_table, mutators, weight=0.7)


# keys ---------------------------------------------------------------------------------------
_KEY_PIECES = (
    "a", "Z", "0", "_", "-", "=", "+", ".", "..", "/", "//", "\\", "\x00", " ", "%2e%2e", "~", "\u00e9",
    "\u202e", "\udc80", ".ttl", ".x.tmp-0", "C:", "\n", "*", "?", "[", "x" * 300, "chunks", "contexts",
    "profiles", "pq", "ns", "0123456789abcdef0123456789abcdef",
)
_HEXES = ("0" * 32, "0123456789abcdef" * 2, "f" * 32)


def _key_case(rng: random.Random, seed: Seed, target: Target) -> Case:
    pool: list[str] = seed.extra["pool"]
    if pool and rng.random() < 0.35:
        text = rng.choice(pool) + "/" + rng.choice(
            (*_HEXES, "chunks", "contexts", "profiles", "pq", "raw-00000000", "x", rng.choice(_HEXES) + "/chunks"))
    else:
        text = "".join(rng.choice(_KEY_PIECES) for _ in range(rng.randint(1, 6)))
    if rng.random() < 0.05:
        text = "/" + text
    return Case(text.encode("utf-8", "surrogatepass"), False, "key", aux=text)


def _keys_target(env: Environment) -> Target:
    from kvstore.admin.checks import CHUNK, MANIFEST, PROFILE, classify
    from kvstore.backends.base import MAX_KEY_LENGTH, validate_key
    from kvstore.backends.local import TTL_DIR, LocalStore
    from kvstore.format.keys import KeyScheme

    local = LocalStore(os.path.join(env.tmp.name, "local"))
    root = os.path.realpath(local.root)
    state: dict[str, Any] = {"pool": [], "seen": {}}

    def decode(case: Case, seed: Seed) -> Any:
        text: str = case.aux
        key = validate_key(text)  # raises InvalidKeyError for anything unsafe
        segments = key.split("/")
        if not (key == text and 0 < len(key) <= MAX_KEY_LENGTH and key.isascii()
                and all(s and not s.startswith(".") for s in segments)):
            raise WrongAnswer(f"unsafe key accepted: {key!r}")
        path = os.path.realpath(local._path(key))
        if not path.startswith(root + os.sep) or path.startswith(os.path.join(root, TTL_DIR) + os.sep) \
                or os.path.relpath(path, root).replace(os.sep, "/") != key:
            raise WrongAnswer(f"key {key!r} maps to {path}, outside its place under {root}")
        scheme = KeyScheme(key)  # the key as a namespace
        fp, name = _hex_for(text), _hex_for(text + "/")
        made = [(CHUNK, scheme.chunk_key(fp, name, "raw-00000000")), (MANIFEST, scheme.manifest_key(fp, name)),
                (PROFILE, scheme.profile_key(fp, name))]
        seen: dict[str, tuple] = state["seen"]
        for kind, k in made:
            info = classify(k)
            if (info.kind, info.namespace, info.fingerprint, info.name) != (kind, key, fp, name):
                raise WrongAnswer(f"key {k!r} of namespace {key!r} reads back as {info}")
            owner = (key, kind, fp, name)
            if seen.setdefault(k, owner) != owner:
                raise WrongAnswer(f"key {k!r} is shared by {seen[k]} and {owner}")
        if len(seen) > 50_000:
            seen.clear()
        pool = state["pool"]  # accepted keys, extended by later cases into nested namespaces
        if len(pool) < 200:
            pool.append(key)
        else:
            pool[len(seen) % 200] = key
        return key

    seed = Seed(b"", None, state)
    return Target("keys", [seed], decode, lambda a, b: True, lambda out, s: True, [(1, _key_case)], weight=0.7)


def _hex_for(text: str) -> str:
    """A hash segment picked by ``text``'s length from a small set, so that equal segments under
    different namespaces (the collisions worth trying) are common."""
    return _HEXES[len(text) % len(_HEXES)]


def build_targets(env: Environment) -> list[Target]:
    """Every fuzz target, with its seed objects built (a few seconds)."""
    fx = _store_fixture(env)
    return [
        _container_target(),
        *_chunk_targets(env.device),
        _profile_target(),
        _manifest_target(fx, env),
        *_pq_targets(fx, env),
        _rans_target(),
        _table_target(),
        _keys_target(env),
    ]


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.tools.fuzz --cases N``: print the report as JSON."""
    parser = argparse.ArgumentParser(description="Fuzz every decoder of stored bytes.")
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=None)
    parser.add_argument("--targets", nargs="*", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    report = run_fuzz(args.cases, args.seed, args.time_budget, targets=args.targets, device=args.device)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
