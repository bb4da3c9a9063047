"""The machine block of every benchmark JSON names the commit the figures belong to."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import machine_info

ROOT = Path(__file__).resolve().parent.parent


def test_kvstore_commit_wins_over_the_checkouts_git(monkeypatch):
    """The GPU machine's copy of the tree carries a stale ``.git``: the commit named by the
    caller must win over what ``git rev-parse`` answers there."""
    monkeypatch.setenv("KVSTORE_COMMIT", "0123abc")
    assert machine_info()["commit"] == "0123abc"


def test_commit_comes_from_git_without_the_variable(monkeypatch):
    monkeypatch.delenv("KVSTORE_COMMIT", raising=False)
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git checkout here")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    info = machine_info()
    assert info["commit"] == head
    assert {"date", "python", "torch", "platform", "cpu_count", "device"} <= set(info)
