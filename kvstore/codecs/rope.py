"""Rotary position embeddings, undone and redone: what a transform codec sees of the keys.

A model stores its keys after RoPE: the pair of channels ``(i, i + D/2)`` of a key at
position ``p`` is rotated by the angle ``p * inv_freq[i]`` (and scaled by the rotary
scaling factor, e.g. YaRN's). The rotation spreads a channel's energy over its pair
differently at every position, which hides the low-rank structure a learned
transform exploits; undone, the keys of all positions share one basis. Undoing and
redoing is exact up to float rounding (a rotation by ``-angle``, then ``+angle``).

:class:`RotaryTable` holds each layer's frequencies and scaling (zero frequencies: a
layer without RoPE); the model-side reader is
:func:`kvstore.integrations.hf_rope.rotary_table`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvstore.errors import CodecError, FormatError
from kvstore.format.container import Container

#: chunk positions a transform codec records (far beyond any context a model serves)
MAX_POSITION = 1 << 40


@dataclass(frozen=True)
class RotaryTable:
    """Per-layer RoPE of a model in the "rotate half" convention: channel ``i`` pairs with ``i + D/2``."""

    inv_freq: torch.Tensor  # [layers, head_dim // 2] float32: radians per position
    scaling: torch.Tensor  # [layers] float32: the factor cos and sin carry (1 for plain RoPE)

    def __post_init__(self) -> None:
        f, s = self.inv_freq, self.scaling
        if f.dtype != torch.float32 or s.dtype != torch.float32 or f.ndim != 2 or s.shape != (f.shape[0],):
            raise CodecError(f"a rotary table is float32 [layers, half_dim] and [layers], got "
                             f"{f.dtype}{list(f.shape)} and {s.dtype}{list(s.shape)}")
        if not bool(torch.isfinite(f).all()) or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise CodecError("rotary frequencies must be finite and scalings finite and positive")

    @property
    def layers(self) -> int:
        return self.inv_freq.shape[0]

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.shape[1]

    @classmethod
    def identity(cls, layers: int, head_dim: int) -> RotaryTable:
        """No RoPE anywhere: undo and redo leave the keys as they are."""
        return cls(torch.zeros(layers, head_dim // 2), torch.ones(layers))

    def select_layers(self, layers: list[int]) -> RotaryTable:
        return RotaryTable(self.inv_freq[layers].contiguous(), self.scaling[layers].contiguous())


def angles(table: RotaryTable, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[L, 1, T, D/2]`` at ``positions`` (without the scaling), computed as
    transformers computes them (float32 products), so that undoing matches what the model did."""
    angle = table.inv_freq.to(device)[:, None, :] * positions.to(device, torch.float32)[None, :, None]
    return angle.cos()[:, None], angle.sin()[:, None]


def rotate(keys: torch.Tensor, table: RotaryTable, start: int, *, inverse: bool = False) -> torch.Tensor:
    """``keys`` ``[L, H, T, D]`` (float32) with RoPE applied at positions ``start ..`` (``inverse``:
    removed, as a model stored them), as a new float32 tensor."""
    L, _, T, D = keys.shape
    if (L, D) != (table.layers, table.head_dim):
        raise CodecError(f"keys of {L} layers x {D} dims do not match the rotary table's "
                         f"{table.layers} x {table.head_dim}")
    cos, sin = angles(table, torch.arange(start, start + T), keys.device)
    scale = table.scaling.to(keys.device)[:, None, None, None]
    a, b = keys[..., : D // 2], keys[..., D // 2 :]
    if inverse:  # rotate by -angle and divide out the scaling
        out = torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1)
        return out.div_(scale)
    out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.mul_(scale)


def position_buffer(start: Any) -> torch.Tensor:
    """The ``position`` buffer of a chunk starting at ``start`` (int64 ``[1]``): its decoder
    redoes RoPE there. :class:`CodecError` for a position that is not an int in range."""
    if type(start) is not int or not 0 <= start < MAX_POSITION:
        raise CodecError(f"start must be a position in [0, 2**40), got {start!r}")
    return torch.tensor([start], dtype=torch.int64)


def read_position(obj: Container, codec: str) -> int:
    """The chunk's first position from its ``position`` buffer (:class:`FormatError` if malformed)."""
    position = obj.tensor("position")
    if position.dtype != torch.int64 or tuple(position.shape) != (1,) or not 0 <= int(position[0]) < MAX_POSITION:
        raise FormatError(f"{codec} position buffer is malformed")
    return int(position[0])
