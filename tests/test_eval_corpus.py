"""Long documents from texts on every machine: length, determinism, sampling."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvstore.errors import ConfigError
from eval import corpus
from eval.corpus import available_sources, documents, samples, source_parts


def test_sources_on_every_machine():
    assert {"pydoc", "licenses"} <= set(available_sources())
    pydoc = source_parts("pydoc")
    assert len(pydoc) > 50 and sum(len(t) for _, t in pydoc) > 400_000
    names = [name for name, _ in source_parts("licenses")]
    assert len(names) == len(set(names)) and "GPL-3" in names and "GPL" not in names  # links once
    with pytest.raises(ConfigError, match="unknown corpus source"):
        source_parts("nope")


@pytest.mark.model
def test_documents_are_long_and_deterministic(smollm2, smollm2_docs):
    assert len(smollm2_docs) >= 10
    for doc in smollm2_docs:
        assert len(doc) >= 8192 and doc.tokens.dtype == torch.long and doc.tokens.ndim == 1
        assert doc.source in available_sources() and doc.name.startswith(doc.source + ":")
    head = doc.text[:200]
    assert smollm2.tokenizer.decode(smollm2.encode(head).tolist()) == head
    again = documents(smollm2.tokenizer, sources=["licenses"], seed=3)
    same = documents(smollm2.tokenizer, sources=["licenses"], seed=3)
    assert [d.name for d in again] == [d.name for d in same]
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(again, same))
    other = documents(smollm2.tokenizer, sources=["licenses"], seed=4)
    assert sorted(d.name for d in other) == sorted(d.name for d in again)
    names = {d.name for d in smollm2_docs}
    assert {d.name for d in again} <= names  # the same documents, whatever the selection


@pytest.mark.model
def test_document_count_and_errors(smollm2):
    picked = documents(smollm2.tokenizer, sources=["licenses"], n=2, seed=1)
    assert len(picked) == 2
    with pytest.raises(ConfigError, match="only"):
        documents(smollm2.tokenizer, sources=["licenses"], n=1000)
    with pytest.raises(ConfigError):
        documents(smollm2.tokenizer, min_tokens=0)


@pytest.mark.model
def test_samples(smollm2_docs):
    docs = smollm2_docs[:3]
    got = samples(docs, context_tokens=2048, continuation_tokens=512, per_document=3, seed=7)
    again = samples(docs, context_tokens=2048, continuation_tokens=512, per_document=3, seed=7)
    assert [(s.document, s.offset) for s in got] == [(s.document, s.offset) for s in again]
    assert all(torch.equal(a.context, b.context) for a, b in zip(got, again))
    assert len(got) == 9
    by_doc = {d.name: d for d in docs}
    for s in got:
        assert len(s.context) == 2048 and len(s.continuation) == 512
        doc = by_doc[s.document].tokens
        assert torch.equal(torch.cat([s.context, s.continuation]), doc[s.offset : s.offset + 2560])
    for name in by_doc:
        offsets = sorted(s.offset for s in got if s.document == name)
        assert all(b - a >= 2560 for a, b in itertools.pairwise(offsets))  # no overlap
    moved = samples(docs, context_tokens=2048, continuation_tokens=512, per_document=3, seed=8)
    assert [s.offset for s in moved] != [s.offset for s in got]
    with pytest.raises(ConfigError, match="fewer than"):
        samples(docs, context_tokens=len(docs[0]), continuation_tokens=1)


def test_kjv_optional():
    parts = corpus._kjv_parts()
    assert parts == [] or (len(parts) == 66 and parts[0][0] == "Genesis")
