"""Every Triton kernel variant compiles for the H100/H200 architecture (sm_90), on any machine.

The interpreted kernel tests never lower a kernel, so this is what catches a kernel that
only fails on a real GPU (the inline PTX of the ``ballot`` and ``prefetch`` paths, for one:
the interpreter never runs it). It compiles through Triton's compiler and the ``ptxas`` shipped
with Triton, in a subprocess without ``TRITON_INTERPRET`` (the kernel tests switch the
interpreter on for their own process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# triton is imported inside the fixture, not here: importing it at collection would stop the
# interpreted kernel tests from switching the interpreter on in this process
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    from triton import knobs

    for tool in ("ptxas", "cuobjdump"):
        if not Path(str(getattr(knobs.nvidia, tool).path)).exists():
            pytest.skip(f"Triton's bundled {tool} is missing")
    out = tmp_path_factory.mktemp("compile") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")
    proc = subprocess.run([sys.executable, "-m", "kvstore.kernels.compile_check", "--arch", "90", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["name"]: r for r in json.loads(out.read_text())}


def test_every_kernel_variant_compiles_for_sm90(reports):
    from kvstore.kernels.compile_check import variants

    assert sorted(reports) == sorted(v.name for v in variants())
    for name, r in reports.items():
        assert r["arch"] == 90 and 0 < r["registers"] <= 255 and r["sass_instructions"] > 50, name
        assert r["local_bytes"] == 0, name  # a spill in any of these would be a performance bug


def test_rans_loops_are_loops_and_the_rows_loop_is_shorter(reports):
    """The decode and encode kernels' main loops are found; the channel-major ``rows`` loop
    drops the model-map, channel-counter and epilogue branches of the generic one."""
    default = reports["rans_decode (default: lookup 1, ballot, prefetch)"]
    rows = reports["rans_decode channel-major rows (ROWS)"]
    assert 50 < rows["loop_instructions"] < default["loop_instructions"] * 0.8
    assert rows["registers"] <= default["registers"]
    assert reports["rans_encode (default: ballot)"]["loop_instructions"] > 40


def test_unknown_constexpr_is_a_clear_error():
    from kvstore.errors import ConfigError
    from kvstore.kernels.compile_check import Variant, _source

    class FakeKernel:
        arg_names = ["x_ptr", "N"]

    with pytest.raises(ConfigError, match="no argument"):
        _source(FakeKernel(), Variant("fake", lambda: FakeKernel(), "*fp32", {"M": 1}))
    with pytest.raises(ConfigError, match="argument types"):
        _source(FakeKernel(), Variant("fake", lambda: FakeKernel(), "*fp32, i32, i32", {"N": 4}))
