"""``kvstore demo --quick --json``: the figures the product issue names, from a real run on a local store."""

from __future__ import annotations

import json
import math

import pytest

from kvstore.cli import main

pytestmark = pytest.mark.model


def test_quick_demo_writes_its_figures_and_plot(smollm2, tmp_path, capsys):
    out, png = tmp_path / "demo.json", tmp_path / "demo.png"
    store = (tmp_path / "store").as_uri()
    assert main(["demo", "--quick", "--store", store, "--json", str(out), "--png", str(png)]) == 0
    result = json.loads(out.read_text())
    names = [level["name"] for level in result["levels"]]
    assert names[:2] == ["raw", "int8"] and len(names) == 8
    bits = [level["bits_per_element"] for level in result["levels"]]
    assert bits[0] == pytest.approx(16, rel=0.01) and bits == sorted(bits, reverse=True)  # smaller at each level
    assert all(math.isfinite(level["ppl_increase_pct"]) for level in result["levels"])
    assert result["levels"][0]["ppl_increase_pct"] == pytest.approx(0, abs=1e-6)  # raw is lossless
    assert result["answer_matches_full_kv"] is True
    assert 0 < result["ttft_s"] < result["recompute_s"]
    default = next(level for level in result["levels"] if level["name"] == result["default_level"])
    assert result["default_level"] == "kvcodec3-L2"
    assert 0 < result["pq"]["bytes"] < default["stored_bytes"]  # the index is small next to the KV it indexes
    assert len(result["timeline"]["decisions"]) == len(result["stream"]["levels"]) == 8
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PQ codes" in capsys.readouterr().out
