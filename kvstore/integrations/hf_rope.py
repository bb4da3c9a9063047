"""Read a transformers model's RoPE, per layer, for the transform codecs (:mod:`kvstore.codecs.rope`).

The rotary embedding module is asked for its cos and sin, as the model's own forward
does (with each layer's ``layer_type`` where a model keeps one RoPE per layer kind, as
Gemma 3 does), so that every initialisation transformers knows (default, linear,
Llama 3, YaRN with its attention scaling, ...) is read the same way. The module's
``inv_freq`` and ``attention_scaling`` are read and checked against its cos and sin at
far positions, computed as the model computes them (float32 angles): a RoPE this
reader would undo wrongly (partial rotary dims, dynamic scaling) is refused.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from kvstore.codecs.rope import RotaryTable, angles
from kvstore.errors import ConfigError
from kvstore.integrations.hf import _text_config, cache_layout, kv_layout

CHECK_POSITIONS = (1, 7, 1000, 100_003)


def _rotary_module(model: Any) -> Any | None:
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    return None


def _cos_sin(module: Any, positions: list[int], head_dim: int, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    buffer = next(iter(module.buffers()), None)
    device = buffer.device if buffer is not None else torch.device("cpu")
    x = torch.zeros(1, len(positions), head_dim, device=device, dtype=torch.float32)
    ids = torch.tensor([positions], device=device)
    if "layer_type" in inspect.signature(module.forward).parameters:
        cos, sin = module(x, ids, layer_type=layer_type)
    else:
        cos, sin = module(x, ids)
    return cos[0].double().cpu(), sin[0].double().cpu()


def rotary_table(model: Any) -> RotaryTable:
    """The model's RoPE frequencies and scaling per layer with per-token keys; a model without a rotary module
    gets the identity (its keys are stored as projected). :class:`ConfigError` for a RoPE
    this reader cannot undo exactly (partial rotary dims, angles not linear in position)."""
    cache = cache_layout(model)
    if any(spec.slots != "kv" for spec in cache.layers):
        raise ConfigError("the model caches MLA latents, not post-RoPE keys: transform codecs cannot undo their RoPE")
    rows = cache.token_layers  # the table's rows: the layers with per-token keys
    L, D = len(rows), kv_layout(model).head_dim
    module = _rotary_module(model)
    if module is None:
        return RotaryTable.identity(L, D)
    cfg = _text_config(model)
    layer_types = getattr(cfg, "layer_types", None) or [None] * cache.num_layers
    types = [layer_types[i] for i in rows]
    per_type: dict[Any, tuple[torch.Tensor, float]] = {}
    for layer_type in dict.fromkeys(types):
        prefix = f"{layer_type}_" if layer_type is not None and hasattr(module, f"{layer_type}_inv_freq") else ""
        inv_freq = getattr(module, f"{prefix}inv_freq", None)
        scaling = float(getattr(module, f"{prefix}attention_scaling", 1.0))
        if not isinstance(inv_freq, torch.Tensor) or inv_freq.shape != (D // 2,):
            raise ConfigError(f"the model's rotary embedding ({type(module).__name__}) has no {D // 2}-entry "
                              "inv_freq (partial rotary dims?); transform codecs cannot undo it")
        if not math.isfinite(scaling) or scaling <= 0:
            raise ConfigError(f"the model's rotary scaling {scaling} is not a positive number")
        inv_freq = inv_freq.detach().float().cpu()
        table = RotaryTable(inv_freq[None], torch.tensor([scaling]))
        cos, sin = _cos_sin(module, list(CHECK_POSITIONS), D, layer_type)
        mine_cos, mine_sin = angles(table, torch.tensor(CHECK_POSITIONS), torch.device("cpu"))
        mine_cos, mine_sin = mine_cos[0, 0] * scaling, mine_sin[0, 0] * scaling
        width = cos.shape[-1]  # D (each angle for both halves) or D/2 (GPT-OSS: once)
        halves = [cos[:, : D // 2]] + ([cos[:, D // 2 :]] if width == D else [])
        if width not in (D, D // 2) or not (all(torch.allclose(h.float(), mine_cos, atol=1e-5) for h in halves)
                                            and torch.allclose(sin[:, : D // 2].float(), mine_sin, atol=1e-5)):
            raise ConfigError(f"the model's rotary embedding ({type(module).__name__}) does not rotate channel "
                              f"i with i + {D // 2} by position x inv_freq; transform codecs cannot undo it")
        per_type[layer_type] = (inv_freq, scaling)
    inv = torch.stack([per_type[t][0] for t in types])
    scale = torch.tensor([per_type[t][1] for t in types], dtype=torch.float32)
    return RotaryTable(inv.contiguous(), scale)
