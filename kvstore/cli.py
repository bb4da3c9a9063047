"""The ``kvstore`` command line: benchmarks now; store inspection and the demo later."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kvstore.errors import KVStoreError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvstore.bench import run_benchmark

    result = run_benchmark(args.name, quick=args.quick)
    text = json.dumps(result, indent=2, sort_keys=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    else:
        print(text)
    return EXIT_OK


def _storage_options(pairs: Sequence[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KVStoreError(f"storage options are KEY=VALUE (VALUE may be JSON), got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvstore.demo import run

    run(store_url=args.store, quick=args.quick, json_path=args.json, png_path=args.png,
        storage_options=_storage_options(args.option))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from kvstore.bench import BENCHMARKS

    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark and write its figures as JSON")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    bench.add_argument("--json", metavar="PATH", help="write the JSON here instead of stdout")
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser("demo", help="store and reload a real model's KV; print sizes, times, quality")
    demo.add_argument("--store", metavar="URL", help="store URL (default: a local directory in the cache)")
    demo.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                      help="a storage option, e.g. endpoint_url=http://localhost:9000 (repeatable)")
    demo.add_argument("--quick", action="store_true", help="a shorter context (about a minute)")
    demo.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    demo.add_argument("--png", metavar="PATH", default="kvstore-demo.png", help="where to write the plot")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvstore`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except KVStoreError as exc:
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
