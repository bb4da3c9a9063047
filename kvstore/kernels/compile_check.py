"""Compile every Triton kernel of :mod:`kvstore.kernels` for a GPU architecture, without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run the kernels on a CPU) executes
the kernels' Python with numpy: it never lowers them, so a kernel that only fails to compile
for a real GPU (an unsupported op, inline PTX, a type the backend rejects) passes every
interpreted test. This module lowers each kernel variant the launchers use through Triton's
own compiler and the ``ptxas`` shipped with it, for a target such as ``sm_90`` (H100/H200),
and reports what the machine code costs: registers, local memory (spills), shared memory and the number of
SASS instructions in the kernel's main loop (the issue-bound floor of a latency-free loop is
proportional to it). ``python -m kvstore.kernels.compile_check [--arch 90] [--json PATH]``
prints the table; ``tests/test_kernels_compile.py`` compiles everything in CI.

Each variant names its argument types in the ``triton.tools.compile`` notation (``"*fp16:16"``
a 16-byte aligned pointer, ``"i32"`` an integer) and its ``constexpr`` values. A launcher that
gains an argument or a ``constexpr`` the table does not name fails here with Triton's error.
Needs triton imported *without* the interpreter (``TRITON_INTERPRET`` unset).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvstore.errors import ConfigError

__all__ = ["KernelReport", "Variant", "compile_variant", "main", "main_loop_instructions", "variants"]


@dataclass(frozen=True)
class Variant:
    """One compilation of one kernel: ``signature`` lists every argument in order (types for
    runtime arguments, ``constexpr`` values by name in ``constexprs``); ``options`` are the
    launch options (``num_warps``...)."""

    name: str
    kernel: Callable[[], Any]  # returns the @triton.jit function (imported lazily)
    signature: str
    constexprs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KernelReport:
    """What one variant compiled to."""

    name: str
    arch: int
    registers: int
    local_bytes: int  # local memory per thread (stack and register spills)
    shared_bytes: int
    sass_instructions: int
    loop_instructions: int | None  # the largest loop's body (None: no loop)


def _kernel(module: str, name: str) -> Callable[[], Any]:
    """A getter for kernel ``name`` of ``kvstore.kernels.<module>``, imported on first use (so
    listing the variants imports neither triton nor the kernels)."""

    def get() -> Any:
        return getattr(importlib.import_module(f"kvstore.kernels.{module}"), name)

    return get


_decode = _kernel("rans_decode", "_rans_decode_kernel")
_encode = _kernel("rans_encode", "_rans_encode_kernel")
_quantize = _kernel("quantize", "_kvcodec_quantize_kernel")
_reconstruct = _kernel("kvcodec3_decode", "_reconstruct_kernel")


_DECODE_SIG = ("*i64:16, *i32:16, *i16:16, *i32:16, *u8:16, {cf}:16, *u8:16, {cf}:16, *u8:16, {cf}:16, "
               "*fp32:16, *fp32:16, *fp32:16, *u8:16, *{out}:16, *u8:16, *i32:16")  # fmt: skip
_DECODE_CONST = dict(NSTREAMS=3, PREC=15, BB=8, LOOKUP=1, CF64=False, BALLOT=True, BLOCK_G=1, ZERO_SYM=128,
                     NDESC_C=24, PREFETCH=True, ROWS=False, ALIGNED=False)  # fmt: skip
_ENCODE_SIG = "*i64:16, *u8:16, *u8:16, *u8:16, {cf}:16, {cf}:16, {cf}:16, *i32:16, *i16:16, *i32:16, *i32:16, *i32:16"
_PQ_SELECT_SIG = "*fp16:16, *fp32:16, *{codes}:16, *i32:16, *fp32:16, *i8:16, *i64:16, i32:16, i32, i32, i32:16, i32:16, i32:16"
_PQ_SELECT_CONST = dict(M=2, K=64, LOG2K=6, BLOCK_M=2, WORD=True, NC=4096)
_ENCODE_CONST = dict(NSTREAMS=3, PREC=15, CF64=False, BALLOT=True, BLOCK_G=1, NDESC_C=16)

_RECONSTRUCT_SIG = ("*{src}:16, i32:16, *fp16:16, *fp32:16, *fp32:16, *i32:16, *fp32:16, *fp32:16, *u8:16, i32:16, "
                    "*{out}:16, i64, i64, i64, i32, i32, i32, i64, fp32")
_RECONSTRUCT_CONST = {"so_d": 1, "SYMBOLS": True, "BLOCK_T": 64, "BLOCK_R": 32, "ZERO_SYM": 128, "SCALE_STEPS": 4}


def variants() -> list[Variant]:
    """The kernel variants the launchers of :mod:`kvstore.kernels` use (and the measured alternatives)."""
    one_warp = {"num_warps": 1, "enable_fp_fusion": False}
    _pq_options = {"num_warps": 4, "enable_fp_fusion": True}  # the launchers leave Triton's default (fusion on)
    dec = _DECODE_SIG.format(cf="*i64", out="fp16")
    out: list[Variant] = [
        Variant("rans_decode (default: lookup 1, ballot, prefetch)", _decode, dec, _DECODE_CONST, one_warp),
        Variant("rans_decode channel-major rows (ROWS)", _decode, dec, {**_DECODE_CONST, "ROWS": True}, one_warp),
        Variant("rans_decode channel-major aligned rows (ALIGNED)", _decode, dec,
                {**_DECODE_CONST, "ROWS": True, "ALIGNED": True}, one_warp),  # fmt: skip
        Variant("rans_decode lookup 0", _decode, _DECODE_SIG.format(cf="*i32", out="fp16"),
                {**_DECODE_CONST, "LOOKUP": 0}, one_warp),  # fmt: skip
        Variant("rans_decode lookup 2", _decode, _DECODE_SIG.format(cf="*i32", out="fp16"),
                {**_DECODE_CONST, "LOOKUP": 2}, one_warp),  # fmt: skip
        Variant("rans_decode precision 16 (cf64)", _decode, dec,
                {**_DECODE_CONST, "PREC": 16, "LOOKUP": 0, "CF64": True}, one_warp),  # fmt: skip
        Variant("rans_decode 2 groups/program (scan)", _decode, _DECODE_SIG.format(cf="*i64", out="bf16"),
                {**_DECODE_CONST, "BALLOT": False, "PREFETCH": False, "BLOCK_G": 2}, one_warp),  # fmt: skip
        Variant("rans_encode (default: ballot)", _encode, _ENCODE_SIG.format(cf="*i32"), _ENCODE_CONST, one_warp),
        Variant("rans_encode precision 16 (cf64)", _encode, _ENCODE_SIG.format(cf="*i64"),
                {**_ENCODE_CONST, "PREC": 16, "CF64": True}, one_warp),  # fmt: skip
        Variant("rans_encode 2 groups/program (scan)", _encode, _ENCODE_SIG.format(cf="*i32"),
                {**_ENCODE_CONST, "BALLOT": False, "BLOCK_G": 2}, {"num_warps": 2, "enable_fp_fusion": False}),  # fmt: skip
        Variant("dequantize rowscale", _kernel("dequantize", "_rowscale_kernel"), "*u8:16, *u8:16, *fp32:16, *fp16:16, i64",
                {"ROW": 128, "ZERO_SYM": 128, "BLOCK_C": 4096}, {"num_warps": 8, "enable_fp_fusion": False}),  # fmt: skip
        Variant("dequantize affine", _kernel("dequantize", "_affine_kernel"), "*u8:16, *fp32:16, *fp32:16, *bf16:16, i64, i32",
                {"ROW": 128, "ZERO_SYM": 128, "BLOCK_C": 4096}, {"num_warps": 8, "enable_fp_fusion": False}),  # fmt: skip
        Variant("dequantize kv channel-major", _kernel("dequantize", "_kv_channel_major_kernel"),
                "*u8:16, *u8:16, *fp32:16, *fp32:16, *fp32:16, *fp16:16, i32, i32, i64",
                {"ZERO_SYM": 128, "BLOCK_T": 64, "BLOCK_D": 128}, {"num_warps": 8, "enable_fp_fusion": False}),  # fmt: skip
        Variant("kvcodec quantize (fused, channel-major symbols)", _quantize,
                "*fp16:16, *fp16:16, *fp32:16, *fp32:16, *fp32:16, *u8:16, *u8:16, *u8:16, *i32:16, i32, i32",
                {"D": 128, "BLOCK_D": 128, "BLOCK_T": 16, "ZERO_SYM": 128, "SCALE_STEPS": 4, "CHANNEL_MAJOR": True},
                {"num_warps": 4, "enable_fp_fusion": False}),  # fmt: skip
        Variant("kvcodec quantize (fused, token-major, bf16, D=96)", _quantize,
                "*bf16:16, *bf16:16, *fp32:16, *fp32:16, *fp32:16, *u8:16, *u8:16, *u8:16, *i32:16, i32, i32",
                {"D": 96, "BLOCK_D": 128, "BLOCK_T": 16, "ZERO_SYM": 128, "SCALE_STEPS": 4, "CHANNEL_MAJOR": False},
                {"num_warps": 4, "enable_fp_fusion": False}),  # fmt: skip
        # kvcodec3's inverse transform as its launcher runs it: a unit channel stride (specialized)
        Variant("kvcodec3 reconstruct keys (symbols, D=64, fp16)", _reconstruct, _RECONSTRUCT_SIG.format(src="u8", out="fp16"),
                {**_RECONSTRUCT_CONST, "KEYS": True, "HALF": 32, "HALF_P": 32}, {"num_warps": 4}),  # fmt: skip
        Variant("kvcodec3 reconstruct values (symbols, D=128, bf16)", _reconstruct,
                _RECONSTRUCT_SIG.format(src="u8", out="bf16"),
                {**_RECONSTRUCT_CONST, "KEYS": False, "HALF": 64, "HALF_P": 64}, {"num_warps": 4}),  # fmt: skip
        Variant("kvcodec3 reconstruct keys (patched float32 coordinates, D=80)", _reconstruct,
                _RECONSTRUCT_SIG.format(src="fp32", out="fp16"),
                {**_RECONSTRUCT_CONST, "KEYS": True, "SYMBOLS": False, "HALF": 40, "HALF_P": 64}, {"num_warps": 4}),  # fmt: skip
        Variant("pq lut", _kernel("pq_topk", "_pq_lut_kernel"), "*fp16:16, *fp16:16, *fp32:16, i32",
                {"GROUP": 4, "M": 32, "K": 256, "SUB": 4, "BLOCK_D": 4}, _pq_options),  # fmt: skip
        Variant("pq score", _kernel("pq_topk", "_pq_score_kernel"), "*u8:16, *fp32:16, *fp32:16, i32, i32, i64, i64",
                {"M": 32, "K": 256, "BLOCK_M": 32, "BLOCK_N": 1024}, _pq_options),  # fmt: skip
        # the PQ select as retrieval launches it: start (32 sinks), seg_len and the head stride
        # divisible by 16, a unit token stride (Triton specializes an int equal to 1)
        Variant("pq segment count (m=2, K=64)", _kernel("pq_select", "_pq_segment_count_kernel"),
                "*i16:16, *i32:16, i32:16, i32, i32:16, i32:16", {**_PQ_SELECT_CONST, "stride_cn": 1, "BLOCK_N": 4096},
                {**_pq_options, "num_warps": 8}),  # fmt: skip
        Variant("pq select (m=2, K=64, group 4, fp16 query)", _kernel("pq_select", "_pq_select_kernel"),
                _PQ_SELECT_SIG.format(codes="i16"),
                {**_PQ_SELECT_CONST, "stride_cn": 1, "GROUP": 4, "SUB": 64, "BLOCK_D": 64, "BLOCK_N": 1024, "ROWS": 4},
                {**_pq_options, "num_warps": 8}),  # fmt: skip
        Variant("pq select (m=3, K=16, byte codes)", _kernel("pq_select", "_pq_select_kernel"),
                _PQ_SELECT_SIG.format(codes="u8") + ", i32",
                {**_PQ_SELECT_CONST, "M": 3, "K": 16, "LOG2K": 4, "BLOCK_M": 4, "WORD": False, "GROUP": 4, "SUB": 32,
                 "BLOCK_D": 32, "BLOCK_N": 1024, "ROWS": 4}, {**_pq_options, "num_warps": 8}),  # fmt: skip
        Variant("pq gather", _kernel("pq_topk", "_gather_kernel"), "*fp16:16, *fp16:16, *i64:16, *fp16:16, *fp16:16, i32, i64, i64, i64, i64",
                {"D": 128, "BLOCK_S": 64, "BLOCK_D": 128}, _pq_options),  # fmt: skip
    ]
    return out


def _tool(name: str) -> str:
    from triton import knobs

    return str(getattr(knobs.nvidia, name).path)


def _source(kernel: Any, variant: Variant) -> Any:
    from triton.compiler import ASTSource

    if not hasattr(kernel, "arg_names"):
        raise ConfigError(f"{variant.name}: the kernel is not a compiled @triton.jit function "
                          "(TRITON_INTERPRET is set in this process?)")  # fmt: skip
    unknown = sorted(set(variant.constexprs) - set(kernel.arg_names))
    if unknown:
        raise ConfigError(f"{variant.name}: the kernel has no argument(s) {unknown}")
    runtime = [s.strip() for s in variant.signature.split(",")]
    names = [n for n in kernel.arg_names if n not in variant.constexprs]
    if len(names) != len(runtime):
        raise ConfigError(f"{variant.name}: {len(runtime)} argument types for {len(names)} runtime arguments {names}")
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for name, spec in zip(names, runtime, strict=True):
        ty, _, hint = spec.partition(":")
        signature[name] = ty
        if hint == "16":
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    for name in variant.constexprs:
        signature[name] = "constexpr"
    return ASTSource(kernel, signature, constexprs=dict(variant.constexprs), attrs=attrs)


def main_loop_instructions(sass: str) -> int | None:
    """Instructions of the largest loop in ``sass`` (``cuobjdump -sass`` text): the span from a
    backward branch's target to the branch, inner loops and all branches included."""
    addr = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
    rows = [(int(a, 16), text) for a, text in addr.findall(sass)]
    if not rows:
        return None
    width = rows[1][0] - rows[0][0] if len(rows) > 1 else 16
    best = None
    for at, text in rows:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m:
            target = int(m.group(1), 16)
            if target < at:
                span = (at - target) // width + 1
                best = span if best is None or span > best else best
    return best


def compile_variant(variant: Variant, arch: int = 90) -> KernelReport:
    """Lower ``variant`` for ``sm_<arch>`` with Triton's compiler and ptxas; raises what they raise."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    kernel = variant.kernel()
    compiled = triton.compile(_source(kernel, variant), target=GPUTarget("cuda", arch, 32), options=dict(variant.options))
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    shared = re.search(r"SHARED:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    count = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+\S", sass))
    return KernelReport(variant.name, arch, int(regs.group(1)) if regs else -1, int(local.group(1)) if local else 0,
                        int(shared.group(1)) if shared else 0, count, main_loop_instructions(sass))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command line: compile every variant, print a table, optionally write the reports as JSON."""
    parser = argparse.ArgumentParser(prog="python -m kvstore.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--json", type=Path, help="write the reports here")
    parser.add_argument("--only", default="", help="compile only the variants whose name contains this")
    args = parser.parse_args(argv)
    reports = [compile_variant(v, args.arch) for v in variants() if args.only in v.name]
    print(f"{'kernel variant':52} {'regs':>5} {'local':>5} {'smem':>6} {'sass':>5} {'loop':>5}")
    for r in reports:
        loop = "-" if r.loop_instructions is None else str(r.loop_instructions)
        print(f"{r.name:52} {r.registers:5d} {r.local_bytes:5d} {r.shared_bytes:6d} {r.sass_instructions:5d} {loop:>5}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
