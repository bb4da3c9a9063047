"""A model's ``kvcodec`` profile, calibrated once on text the evaluation never uses.

Calibration reads the license texts that ship with the system, so that the
perplexity measured on the Python documentation (the evaluation corpus) is on
text the profile has not seen, in another domain. The profile is cached on
disk beside the converted model, so later runs load it in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from kvstore.codecs.kvcodec3_profile import DEFAULT_GROUP_LAYERS, SINK_TOKENS, TransformProfile
from kvstore.codecs.kvcodec_profile import DEFAULT_LEVELS, KVCodecProfile, Level
from kvstore.codecs.kvtc_ref import KVTCProfile, build_kvtc_profile
from eval.corpus import documents
from eval.model import LoadedModel, cache_root
from kvstore.integrations.hf_calibrate import DEFAULT_TARGETS_PCT
from kvstore.integrations.hf import extract_kv
from kvstore.integrations.hf_profile import profile_model, transform_profile_model
from kvstore.integrations.hf_rope import rotary_table
from kvstore.kv import stack_span

CALIBRATION_SOURCE = "licenses"
EVALUATION_SOURCE = "pydoc"
CALIBRATION_VERSION = 1  # bumped when calibration changes what it computes (invalidates cached profiles)


def calibration_contexts(tokenizer: object, n: int = 2, context_tokens: int = 2048) -> list[torch.Tensor]:
    """``n`` contexts of ``context_tokens`` from the calibration texts (deterministic)."""
    docs = documents(tokenizer, sources=[CALIBRATION_SOURCE], n=n, seed=1234)
    return [doc.tokens[:context_tokens] for doc in docs]


def _cache_path(lm: LoadedModel, recipe: dict, suffix: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    text = json.dumps({"model": lm.model_id, "calibration": CALIBRATION_VERSION, "source": CALIBRATION_SOURCE,
                       **recipe}, sort_keys=True)
    name = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return cache_root(cache_dir) / "profiles" / f"{name}.{suffix}"


def _store(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def transform_profile(
    lm: LoadedModel,
    *,
    group_layers: int = DEFAULT_GROUP_LAYERS,
    contexts: int = 2,
    context_tokens: int = 2048,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[TransformProfile, float]:
    """The model's ``kvcodec3`` profile (from the disk cache, or calibrated on the license texts
    on top of :func:`model_profile`'s query statistics) and the seconds it took to make."""
    path = _cache_path(lm, {"codec": "kvcodec3", "group_layers": group_layers, "contexts": contexts,
                        "context_tokens": context_tokens, "targets_pct": list(DEFAULT_TARGETS_PCT),
                        "sink_tokens": SINK_TOKENS}, "kv3profile", cache_dir)
    if path.is_file():
        profile = TransformProfile.from_bytes(path.read_bytes())
        return profile, float(profile.calibration.get("seconds", 0.0)) if profile.calibration else 0.0
    base = model_profile(lm, contexts=contexts, context_tokens=context_tokens, cache_dir=cache_dir)
    started = time.perf_counter()
    profile = transform_profile_model(lm.model, calibration_contexts(lm.tokenizer, contexts, context_tokens),
                                      base=base, group_layers=group_layers)
    seconds = time.perf_counter() - started
    profile = replace(profile, calibration={**(profile.calibration or {}), "seconds": round(seconds, 1)})
    _store(path, profile.to_bytes())
    return profile, seconds


def kvtc_profile(
    lm: LoadedModel,
    *,
    contexts: int = 2,
    context_tokens: int = 2048,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[KVTCProfile, float]:
    """The model's ``kvtc_ref`` profile (KVTC's calibration on the license texts) and the
    seconds it took to make (recorded beside the disk cache's file; 0 if that record is gone)."""
    path = _cache_path(lm, {"codec": "kvtc_ref", "contexts": contexts, "context_tokens": context_tokens},
                   "kvtcprofile", cache_dir)
    seconds_path = path.with_name(path.name + ".seconds")
    if path.is_file():
        try:
            seconds = float(seconds_path.read_text())
        except (OSError, ValueError):
            seconds = 0.0
        return KVTCProfile.from_bytes(path.read_bytes()), seconds
    started = time.perf_counter()
    samples = []
    for tokens in calibration_contexts(lm.tokenizer, contexts, context_tokens):
        kv = extract_kv(lm.model, tokens)
        samples.append(stack_span(kv))
    profile = build_kvtc_profile(samples, rotary_table(lm.model))
    seconds = time.perf_counter() - started
    _store(path, profile.to_bytes())
    _store(seconds_path, f"{seconds:.1f}".encode())
    return profile, seconds


def model_profile(
    lm: LoadedModel,
    *,
    levels: Sequence[Level] = DEFAULT_LEVELS,
    targets_pct: Sequence[float] | None = DEFAULT_TARGETS_PCT,
    contexts: int = 2,
    context_tokens: int = 2048,
    cache_dir: str | os.PathLike[str] | None = None,
) -> KVCodecProfile:
    """The model's kvcodec profile: from the disk cache, or calibrated (a few minutes on a CPU),
    its levels meeting ``targets_pct`` (see :func:`~kvstore.integrations.hf_profile.profile_model`)."""
    recipe = json.dumps(
        {"model": lm.model_id, "levels": [[lv.beta, lv.gamma] for lv in levels],
         "targets_pct": None if targets_pct is None else list(targets_pct), "calibration": CALIBRATION_VERSION,
         "contexts": contexts, "context_tokens": context_tokens, "source": CALIBRATION_SOURCE},
        sort_keys=True,
    )
    name = hashlib.blake2b(recipe.encode(), digest_size=16).hexdigest()
    path = cache_root(cache_dir) / "profiles" / f"{name}.kvprofile"
    if path.is_file():
        return KVCodecProfile.from_bytes(path.read_bytes())
    profile = profile_model(lm.model, calibration_contexts(lm.tokenizer, contexts, context_tokens), levels=levels,
                            targets_pct=targets_pct)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(profile.to_bytes())
    os.replace(tmp, path)
    return profile


