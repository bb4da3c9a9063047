"""What the Triton kernel test modules share: Triton's interpreter switched on where there is
no GPU, and the fallback when it could not be.

The interpreter must be on before ``triton`` is first imported, so a kernel test module
imports this first: without CUDA, and with triton not yet imported in the process, it sets
``TRITON_INTERPRET=1``. If something imported triton earlier, the module's interpreted tests
skip themselves (:data:`interp`) and its :func:`rerun_interpreted` test runs them in a fresh
interpreter instead (:data:`rerun_needed` marks it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from kvstore.kernels import interpreter_supported  # noqa: E402
from kvstore.kernels.rans_decode import interpreter_active  # noqa: E402

INTERP = not CUDA and interpreter_active()
interp = pytest.mark.skipif(not (INTERP and interpreter_supported()),
                            reason="needs the Triton interpreter (>= 3.9) on from the start of the process")
rerun_needed = pytest.mark.skipif(
    INTERP or CUDA or not interpreter_supported(),
    reason="the interpreted tests ran in this process, or this Triton's interpreter cannot run them")


def rerun_interpreted(module_file: str) -> None:
    """Run the tests of ``module_file`` (but the ``gpu`` ones) in a fresh interpreter with
    ``TRITON_INTERPRET=1``; assert that they pass."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", module_file],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
