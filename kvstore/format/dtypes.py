"""The element types a container buffer may hold, by their stored names."""

from __future__ import annotations

import torch

from kvstore.errors import FormatError

#: stored name -> (torch dtype, bytes per element); little-endian on the store
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "uint8": (torch.uint8, 1),
    "int8": (torch.int8, 1),
    "int16": (torch.int16, 2),
    "uint16": (torch.uint16, 2),
    "int32": (torch.int32, 4),
    "uint32": (torch.uint32, 4),
    "int64": (torch.int64, 8),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "float32": (torch.float32, 4),
}
_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The stored name of a torch dtype."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored; supported: {sorted(DTYPES)}") from None


def torch_dtype(name: str) -> tuple[torch.dtype, int]:
    """The torch dtype and item size of a stored dtype name."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown stored dtype {name!r}") from None
