"""Throughput and efficiency benchmark of the rANS coder: ``python -m benchmarks.rans``.

Draws symbols ``[layers, tokens, channels]`` from one discretized Gaussian per
(layer, channel) (widths chosen for ~2-4 bits of entropy), profiles a
:class:`FrequencyTable` on them, and reports encode/decode symbols/s (best of
``repeat``) and ``entropy_efficiency`` = ideal bits under the stored model /
coded bits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kvstore.codecs.rans import decode, encode, read_header
from kvstore.codecs.symbol_model import DEFAULT_PRECISION, FrequencyTable, count_symbols, ideal_code_bits


def synthetic(layers: int, tokens: int, channels: int, alphabet: int = 32, bits: float = 3.0, seed: int = 0):
    """Symbols uint8 [layers, tokens, channels], model_map [layers, channels], per-model probabilities."""
    rng = np.random.default_rng(seed)
    models = layers * channels
    # a Gaussian of std sigma quantized to unit bins has entropy ~ log2(sigma * sqrt(2 pi e))
    sigma = 2.0 ** (bits + rng.uniform(-0.5, 0.5, models)) / np.sqrt(2 * np.pi * np.e)
    centers = np.arange(alphabet) - (alphabet - 1) / 2
    probs = np.exp(-0.5 * (centers[None, :] / sigma[:, None]) ** 2)
    probs /= probs.sum(axis=1, keepdims=True)
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    model_map = np.arange(models, dtype=np.int64).reshape(layers, channels)
    u = rng.random((layers, tokens, channels))
    sym = np.empty((layers, tokens, channels), dtype=np.uint8)
    for b in range(layers):
        for c in range(channels):
            sym[b, :, c] = np.searchsorted(cdf[model_map[b, c]], u[b, :, c], side="right")
    return sym, model_map, probs


def run(
    layers: int,
    tokens: int,
    channels: int,
    *,
    precision: int = DEFAULT_PRECISION,
    bits: float = 3.0,
    repeat: int = 5,
    threads: int | None = None,
    group_size: int | None = None,
) -> dict:
    """One benchmark case; returns a dict of the measurements."""
    sym, model_map, _ = synthetic(layers, tokens, channels, bits=bits)
    table = FrequencyTable.from_counts(count_symbols(sym, model_map, layers * channels, 32), precision)
    data = encode(sym, table, model_map, group_size=group_size, threads=threads)  # compiles / warms up
    assert np.array_equal(decode(data, table, model_map, threads=threads), sym)
    enc = [_timed(lambda: encode(sym, table, model_map, group_size=group_size, threads=threads)) for _ in range(repeat)]
    dec = [_timed(lambda: decode(data, table, model_map, threads=threads)) for _ in range(repeat)]
    t_enc, t_dec = min(w for w, _ in enc), min(w for w, _ in dec)
    c_enc, c_dec = min(c for _, c in enc), min(c for _, c in dec)
    ideal = ideal_code_bits(sym, table, model_map)
    info = read_header(data)
    return {
        "shape": sym.shape, "models": layers * channels, "precision": precision, "groups": info.num_groups,
        "ideal_bits_per_symbol": ideal / sym.size, "coded_bits_per_symbol": 8 * len(data) / sym.size,
        "entropy_efficiency": ideal / (8 * len(data)),
        "encode_msym_s": sym.size / t_enc / 1e6, "decode_msym_s": sym.size / t_dec / 1e6,
        "encode_msym_per_cpu_s": sym.size / c_enc / 1e6, "decode_msym_per_cpu_s": sym.size / c_dec / 1e6,
    }  # fmt: skip


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: less sensitive to other jobs on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", type=int, default=DEFAULT_PRECISION)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    cases = [(1, 15625, 64), (1, 520, 192), (4, 1024, 1024), (16, 256, 768)]
    for case in cases:
        r = run(*case, precision=args.precision, threads=args.threads, repeat=args.repeat)
        print(
            f"{r['shape']!s:>18} models={r['models']:>5} groups={r['groups']:>4} "
            f"ideal={r['ideal_bits_per_symbol']:.3f} b/sym eff={r['entropy_efficiency']:.4f} "
            f"enc={r['encode_msym_s']:.0f}M/s dec={r['decode_msym_s']:.0f}M/s "
            f"(per CPU-second: enc={r['encode_msym_per_cpu_s']:.0f}M dec={r['decode_msym_per_cpu_s']:.0f}M)"
        )


if __name__ == "__main__":
    main()
