"""A script prefix that makes packages unimportable in a subprocess, as if not installed."""


def block_imports(packages: tuple[str, ...], why: str) -> str:
    """Python source that, run first, makes importing any of ``packages`` (or their
    submodules) raise ``ModuleNotFoundError("No module named '<name>' (<why>)")``."""
    return f"""
import importlib.abc, sys
class BlockImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {tuple(packages)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} ({why})", name=name)
sys.meta_path.insert(0, BlockImports())
"""
