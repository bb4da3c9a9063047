"""The library without its extras: a local or in-memory store, every codec on the CPU, PQ
retrieval and the admin commands work with only the core dependencies installed, a backend
whose client library is missing names the extra that installs it, and the installed
package holds no test tooling, benchmarks or evaluation harness.

Each check runs in a subprocess where the optional packages cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools.blocked_imports import block_imports

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_PACKAGES = (
    "s3fs", "aiobotocore", "botocore", "boto3", "aiohttp", "fsspec", "redis", "hiredis", "transformers",
    "safetensors", "accelerate", "gguf", "matplotlib", "tqdm", "triton", "pytest", "moto", "hypothesis",
)  # fmt: skip

BLOCK_EXTRAS = block_imports(OPTIONAL_PACKAGES, "extra blocked")


def run_core(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``script`` with the extras blocked, outside the checkout (so that only the library
    is importable, as in an install of the package)."""
    return subprocess.run([sys.executable, "-c", BLOCK_EXTRAS + script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def test_a_local_store_with_every_codec_needs_no_extra(tmp_path):
    script = f"""
import torch
from kvstore import SyncKVStore
from kvstore.codecs.kvcodec import KVCodec
from kvstore.codecs.kvcodec_profile import build_profile
from kvstore.retrieval import PQConfig

g = torch.Generator().manual_seed(0)
def kv(tokens):
    return [(torch.randn(2, tokens, 32, generator=g).half(), torch.randn(2, tokens, 32, generator=g).half())
            for _ in range(2)]
fit = [kv(96) for _ in range(2)]
profile = build_profile([(torch.stack([k for k, _ in c]), torch.stack([v for _, v in c])) for c in fit])
tokens = list(range(64))
context = kv(64)
for url in ("memory://", {str(tmp_path / 'store')!r}):
    with SyncKVStore(url, levels=["raw", "int8", KVCodec(profile, 2)], chunk_tokens=16) as kvs:
        kvs.put("m", tokens, context, pq=PQConfig(subspaces=2, bits=4, sinks=4, iters=2))
        raw = kvs.get("m", tokens, level=0)
        assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(raw, context))
        coded = kvs.get("m", tokens, level=2)
        err = max((a.float() - b.float()).abs().max().item() for (a, _), (b, _) in zip(coded, context))
        assert 0 < err < 1.0, err
        assert kvs.get_pq("m", tokens) is not None
import sys
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL_PACKAGES!r})
assert loaded == [], loaded
print("ok")
"""
    result = run_core(script, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("url,extra", [("redis://localhost:1/0", "redis"), ("redis+cluster://localhost:1", "redis"),
                                       ("s3://bucket/prefix", "s3")])
def test_a_backend_without_its_client_names_its_extra(tmp_path, url, extra):
    script = f"""
from kvstore.backends import open_store
from kvstore.errors import ConfigError
try:
    open_store({url!r})
except ConfigError as exc:
    print(exc)
"""
    result = run_core(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pip install 'kvstore[{extra}]'" in result.stdout


def test_the_admin_commands_need_no_extra(tmp_path):
    script = f"""
import sys
from kvstore.cli import main
sys.exit(main(["ls", {str(tmp_path)!r}]))
"""
    result = run_core(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_package_holds_no_test_tooling_benchmarks_or_evaluation():
    package = ROOT / "kvstore"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert {m for m in modules if m.startswith("testing/")} == {"testing/__init__.py", "testing/shaping.py",
                                                                 "testing/store_tests.py"}
    assert not [m for m in modules if "bench" in m or m.startswith(("eval/", "demo"))]


def test_bench_and_demo_outside_a_checkout_say_where_they_run(tmp_path, monkeypatch):
    """Installed without its checkout, ``kvstore bench`` explains itself instead of failing to import."""
    from kvstore import cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "kvstore" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    for name in ("benchmarks", "eval"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from kvstore.errors import ConfigError

    with pytest.raises(ConfigError, match="source checkout"):
        cli.from_checkout("benchmarks")
    assert cli.main(["bench", "store", "--quick"]) == cli.EXIT_ERROR


def test_the_combined_extras_hold_every_extra():
    """``all`` and ``test`` spell their packages out (older pip cannot resolve an extra naming
    the project itself); they must still hold every package of the extras they combine."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [r for reqs in extras.values() for r in reqs if r.startswith("kvstore")]
    combined = {r for name in ("s3", "redis", "hf", "gpu", "bench") for r in extras[name]}
    assert set(extras["all"]) == combined
    assert set(extras["test"]) - set(extras["all"]) == {r for r in extras["test"] if r.split(">")[0].split("[")[0]
                                                       in {"pytest", "pytest-asyncio", "moto", "hypothesis"}}
    assert set(extras["all"]) <= set(extras["test"])
