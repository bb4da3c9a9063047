"""What every kernel module uses: launch-grid arithmetic and whether Triton (and its
interpreter) can run here. Imports no Triton itself."""

from __future__ import annotations

import functools
import re

import torch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. Plain Python: ``triton.cdiv`` is a ``constexpr_function``
    in Triton 3.6, and each host-side call costs microseconds in its argument unwrapping."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``); plain Python, see :func:`cdiv`."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001  # pragma: no cover - a broken install must not break CPU paths
        return False
    return True


#: Triton's interpreter runs the kernels from this version on: 3.6's cannot run a loop whose
#: bound is a computed scalar (its compiler can), see ``benchmarks/kernels_notes.md``.
MIN_INTERPRETER_VERSION = (3, 9)


@functools.cache
def interpreter_supported() -> bool:
    """Whether this Triton's interpreter (``TRITON_INTERPRET=1``, the CPU test path) runs the
    kernels: Triton >= :data:`MIN_INTERPRETER_VERSION`."""
    if not triton_available():
        return False
    import triton

    found = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return bool(found) and (int(found[1]), int(found[2])) >= MIN_INTERPRETER_VERSION


def use_triton(device: torch.device | str) -> bool:
    """Triton for CUDA devices (when it imports), the torch reference elsewhere."""
    return torch.device(device).type == "cuda" and triton_available()
