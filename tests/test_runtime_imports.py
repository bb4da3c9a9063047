"""Every library module imports without the ``test`` extra (pytest, moto, hypothesis...).

The README's demo command installs the package without that extra: a module on the demo's
or a benchmark's import path that needs pytest breaks it, while every other test (run with
the extra installed) still passes. These run the imports in a subprocess where the
test-only packages cannot be imported.
"""

import subprocess
import sys

from tests.tools.blocked_imports import block_imports

# Test helpers by design: they may need the test extra.
TEST_ONLY_MODULES = ("kvstore.testing.store_tests",)
# Engine integrations import their engine, which lives in its own environment (vLLM: .venv-vllm).
ENGINE_PACKAGES = ("vllm",)
TEST_EXTRA_PACKAGES = ("pytest", "_pytest", "pytest_asyncio", "moto", "hypothesis", "boto3")

BLOCK_TEST_EXTRA = block_imports(TEST_EXTRA_PACKAGES, "test extra blocked") + "import importlib, pkgutil\n"

IMPORT_EVERY_MODULE = f"""
import kvstore
failures = []
for info in pkgutil.walk_packages(kvstore.__path__, "kvstore."):
    if info.name in {TEST_ONLY_MODULES!r}:
        continue
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in {ENGINE_PACKAGES!r}:
            failures.append(f"{{info.name}}: {{type(e).__name__}}: {{e}}")
    except Exception as e:  # report every module, not only the first
        failures.append(f"{{info.name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_library_modules_import_without_the_test_extra():
    result = _run(BLOCK_TEST_EXTRA + IMPORT_EVERY_MODULE)
    assert result.returncode == 0, f"modules that need the test extra:\n{result.stdout}\n{result.stderr[-2000:]}"


def test_store_tests_needs_pytest_and_says_so():
    """The blocker works, and ``kvstore.testing.StoreTests`` (imported on first use) names pytest."""
    result = _run(BLOCK_TEST_EXTRA + "from kvstore.testing import StoreTests\n")
    assert result.returncode != 0 and "No module named 'pytest'" in result.stderr
