"""Benchmarks, each a module ``benchmarks.<name>`` run as ``kvstore bench NAME``.

A benchmark module defines ``run(quick: bool) -> dict`` (``run(quick, model=...)`` where it
runs on a choice of real model): it measures, prints a
short human summary to stderr if it likes, and returns the figures its issue
names. The CLI adds the machine, date and commit and writes the JSON.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from kvstore.errors import ConfigError

BENCHMARKS = ("store", "model", "models", "codecs", "kernels", "stream", "retrieval", "faults", "vllm", "load")


def machine_info() -> dict[str, Any]:
    """Where and when a benchmark ran: host CPU/GPU, versions, date, commit."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    info["commit"] = os.environ.get("KVSTORE_COMMIT") or _git_commit() or None
    return info


def _git_commit() -> str | None:
    """The checkout's short commit, or None where there is no git or no repository.
    ``KVSTORE_COMMIT``, when set, wins: the GPU machine's copy of the tree carries a ``.git``
    whose HEAD can be older than the files sent (seen on 2026-11-22)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_benchmark(name: str, quick: bool, model: str | None = None) -> dict[str, Any]:
    """Run benchmark ``name`` and return its figures with the machine info under ``machine``.
    ``model``: the model a real-model benchmark runs on, where it takes one (``codecs``)."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"benchmarks.{name}":
            raise ConfigError(f"benchmark {name!r} is not implemented yet") from exc
        raise
    if model is None:
        result = module.run(quick=quick)
    elif "model" in inspect.signature(module.run).parameters:
        result = module.run(quick=quick, model=model)
    else:
        raise ConfigError(f"benchmark {name!r} runs on a fixed model; --model is not for it")
    return {"benchmark": name, "quick": quick, "machine": machine_info(), **result}
