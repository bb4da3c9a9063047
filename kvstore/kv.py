"""The KV convention at the API: per layer, ``(key, value)`` each ``[kv_heads, tokens, dim]``.

Key and value widths may differ (MLA), and so may heads and widths across layers
(see :class:`~kvstore.format.layout.CacheLayout`). KV given to a store covers every
token in every layer; KV loaded for a prefix may hold, in a sliding-window layer,
only the *last* tokens of the prefix (at least the window the next token attends).
A linear-attention layer has no per-token KV: its entry is a :class:`LinearStates`,
the layer's fixed-size states after some numbers of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

import torch

from kvstore.errors import ConfigError
from kvstore.format.layout import CacheLayout, LayerGroup, LayerSpec

KV: TypeAlias = list[tuple[torch.Tensor, torch.Tensor]]
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class LinearStates:
    """A linear-attention layer's states after given numbers of tokens: for each, its
    convolution state ``[conv_channels, conv_width]`` (the last inputs of its causal
    convolution) and recurrent state ``[heads, key_dim, value_dim]``.

    A layer's entry in KV given to a store holds the states after every chunk boundary
    a later load may continue from (at least after the last token; see
    :func:`kvstore.integrations.hf.extract_kv`'s ``states_every``); an entry loaded for a
    prefix holds the states after its last token."""

    __slots__ = ("_states",)

    def __init__(self, states: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not isinstance(states, Mapping) or not states:
            raise ConfigError("LinearStates needs a non-empty {tokens: (conv_state, recurrent_state)} mapping")
        for n, pair in states.items():
            if type(n) is not int or n < 1:
                raise ConfigError(f"LinearStates: state positions are token counts >= 1, got {n!r}")
            if not (isinstance(pair, Sequence) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
                raise ConfigError(f"LinearStates[{n}] must be a (conv_state, recurrent_state) pair of tensors")
        self._states = dict(sorted(states.items()))

    @property
    def positions(self) -> tuple[int, ...]:
        """The token counts after which states are held, ascending."""
        return tuple(self._states)

    def at(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(conv_state, recurrent_state)`` after ``tokens`` tokens, or ``None`` if not held."""
        return self._states.get(tokens)

    def after(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The states after ``tokens`` tokens; :class:`ConfigError` if not held."""
        pair = self._states.get(tokens)
        if pair is None:
            raise ConfigError(f"a linear-attention layer's states after {tokens} tokens are not held "
                              f"(held after {list(self._states)[:8]})")
        return pair

    def __repr__(self) -> str:
        return f"LinearStates(after={list(self._states)})"


def is_linear(entry: object) -> bool:
    """Whether a KV entry is a linear-attention layer's states rather than a ``(key, value)`` pair."""
    return isinstance(entry, LinearStates)


def token_tensor(kv: Sequence[object]) -> torch.Tensor:
    """The first per-token tensor of ``kv`` (its dtype and device are the KV's)."""
    for entry in kv:
        if not is_linear(entry):
            return entry[0]  # type: ignore[index]
    raise ConfigError("the KV has no layer with per-token keys and values")


#: per layer group, the ``(keys, values)`` tensors ``[layers, kv_heads, tokens, dim]`` a load
#: writes (its layers' tensors are views of them); ``None`` for a linear-attention group
GroupBuffers: TypeAlias = list[tuple[torch.Tensor, torch.Tensor] | None]


class PrefixKV(list):  # type: ignore[type-arg]
    """KV loaded for a context of ``num_tokens`` tokens: a plain per-layer list that also
    says how many tokens it describes (its sliding-window layers may hold fewer).

    ``buffers``: the tensors per layer group that the layers' tensors are views of (what a
    later load given this KV as ``out=`` writes into); ``None`` when not a load's output."""

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], num_tokens: int,
                 buffers: GroupBuffers | None = None) -> None:
        super().__init__(layers)
        self.num_tokens = num_tokens
        self.buffers = buffers


def group_outputs(groups: Sequence[LayerGroup], num_tokens: int, base: Sequence[int], dtype: torch.dtype,
                  device: torch.device, alloc: Callable[..., torch.Tensor], out: object = None) -> GroupBuffers:
    """The tensors a load of ``num_tokens`` tokens writes, per layer group (``base``: the token
    each group's tensors start at): ``out``'s own when given, which must be the KV of an
    earlier load of the same shape, dtype and device; otherwise new ones from ``alloc``.
    Reusing an output skips allocating and first touching its memory on every load."""
    shapes = [tuple((len(g.layers), g.spec.kv_heads, num_tokens - base[g.index], dim)
                    for dim in (g.spec.key_dim, g.spec.value_dim)) if g.spec.per_token else None for g in groups]
    if out is None:
        return [None if pair is None else (alloc(pair[0], dtype=dtype, device=device),
                                           alloc(pair[1], dtype=dtype, device=device)) for pair in shapes]
    buffers = out.buffers if isinstance(out, PrefixKV) else None
    if buffers is None or len(buffers) != len(shapes):
        raise ConfigError("out must be the KV an earlier get (or fetcher load) returned, for a context "
                          "of the same length and cache layout")
    for group, want, have in zip(groups, shapes, buffers):
        if want is None or have is None:
            if (want is None) != (have is None):
                raise ConfigError(f"out does not fit this load: layer group {group.name!r} differs in kind")
            continue
        for shape, t in zip(want, have):
            if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
                raise ConfigError(f"out does not fit this load: layer group {group.name!r} needs {dtype} "
                                  f"{list(shape)} on {device}, out holds {t.dtype} {list(t.shape)} on {t.device}")
    return list(buffers)


def prefix_kv(groups: Sequence[LayerGroup], buffers: GroupBuffers, num_layers: int, num_tokens: int,
              states: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> PrefixKV:
    """The per-layer KV over a load's ``buffers`` (``states``: each linear group's states after
    ``num_tokens``, stacked over its layers)."""
    kv: list = [None] * num_layers
    for group, pair in zip(groups, buffers):
        for j, layer in enumerate(group.layers):
            if pair is None:
                conv, recurrent = (states or {})[group.index]
                kv[layer] = LinearStates({num_tokens: (conv[j], recurrent[j])})
            else:
                kv[layer] = (pair[0][j], pair[1][j])
    return PrefixKV(kv, num_tokens, buffers)


def check_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], num_tokens: int, layout: CacheLayout) -> torch.Tensor:
    """Validate ``kv`` (every layer covering ``num_tokens`` tokens) against ``layout`` (layer
    count, heads and widths per layer); return its first tensor, whose dtype and device every
    other tensor shares."""
    if not isinstance(kv, Sequence) or len(kv) == 0:
        raise ConfigError("kv must be a non-empty sequence of (key, value) pairs, one per layer")
    if len(kv) != layout.num_layers:
        raise ConfigError(f"the layout has {layout.num_layers} layers but the KV has {len(kv)}")
    first = None
    for i, pair in enumerate(kv):
        spec = layout.layers[i]
        if not spec.per_token:
            check_states(i, pair, spec, num_tokens)
            continue
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise ConfigError(f"kv[{i}] must be a (key, value) pair")
        for name, t in zip(("key", "value"), pair):
            if not isinstance(t, torch.Tensor) or t.ndim != 3:
                raise ConfigError(f"kv[{i}] {name} must be a 3-D tensor [kv_heads, tokens, dim]")
            if t.dtype not in KV_DTYPES:
                raise ConfigError(f"kv[{i}] {name} has dtype {t.dtype}; supported: {KV_DTYPES}")
            if first is None:
                first = t
            if t.dtype != first.dtype or t.device != first.device:
                raise ConfigError(f"kv[{i}] {name} is {t.dtype} on {t.device}; every tensor must match "
                                  f"kv[0] key, {first.dtype} on {first.device}")
            if t.shape[1] != num_tokens:
                raise ConfigError(f"kv[{i}] {name} covers {t.shape[1]} tokens but {num_tokens} token ids were given")
            want = (spec.kv_heads, spec.key_dim if name == "key" else spec.value_dim)
            if (t.shape[0], t.shape[2]) != want:
                raise ConfigError(f"kv[{i}] {name} is {list(t.shape)}; the layout expects "
                                  f"[{want[0]}, tokens, {want[1]}]")
    assert first is not None
    return first


def check_states(i: int, entry: object, spec: LayerSpec, num_tokens: int,
                 error: type[ConfigError] = ConfigError) -> None:
    """Raise ``error`` unless ``entry`` (``kv[i]``, of a linear layer ``spec``) holds states of
    the layout's shapes, none after more than ``num_tokens`` tokens, and those after the
    context's last token."""
    if not is_linear(entry):
        raise error(f"kv[{i}] is a linear-attention layer: its entry must be LinearStates, "
                    f"got {type(entry).__name__}")
    assert isinstance(entry, LinearStates)
    shapes = spec.state_shapes()
    for n in entry.positions:
        if n > num_tokens:
            raise error(f"kv[{i}] holds states after {n} tokens, beyond the {num_tokens} given")
        for name, t, shape in zip(("convolution", "recurrent"), entry.after(n), shapes):
            if tuple(t.shape) != shape or t.dtype not in KV_DTYPES:
                raise error(f"kv[{i}] {name} state after {n} tokens is {t.dtype} {list(t.shape)}; "
                            f"the layout expects {list(shape)} of {KV_DTYPES}")
    if entry.at(num_tokens) is None:
        raise error(f"kv[{i}] holds no linear-attention states after the context's last token ({num_tokens})")


def stack_span(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int = 0, stop: int | None = None,
               layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens ``[start, stop)`` (default: every token) of ``layers`` (all by
    default), stacked as ``[layers, kv_heads, stop - start, dim]``."""
    picked = [kv[i] for i in layers] if layers is not None else kv
    keys = torch.stack([k[:, start:stop] for k, _ in picked])
    values = torch.stack([v[:, start:stop] for _, v in picked])
    return keys, values

