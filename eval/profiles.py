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
from collections.abc import Sequence

import torch

from kvstore.codecs.kvcodec_profile import DEFAULT_LEVELS, KVCodecProfile, Level
from eval.corpus import documents
from eval.model import LoadedModel, cache_root
from kvstore.integrations.hf_calibrate import DEFAULT_TARGETS_PCT
from kvstore.integrations.hf_profile import profile_model

CALIBRATION_SOURCE = "licenses"
EVALUATION_SOURCE = "pydoc"
CALIBRATION_VERSION = 1  # bumped when calibration changes what it computes (invalidates cached profiles)


def calibration_contexts(tokenizer: object, n: int = 2, context_tokens: int = 2048) -> list[torch.Tensor]:
    """``n`` contexts of ``context_tokens`` from the calibration texts (deterministic)."""
    docs = documents(tokenizer, sources=[CALIBRATION_SOURCE], n=n, seed=1234)
    return [doc.tokens[:context_tokens] for doc in docs]


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


