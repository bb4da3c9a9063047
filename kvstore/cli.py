"""The ``kvstore`` command line: inspect, verify and clean stores; run the demo and the benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from kvstore.errors import ConfigError, ContextNotFoundError, KVStoreError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DAMAGED, EXIT_NOT_FOUND = 0, 1, 2, 3, 4

EPILOG = """\
store URLs: memory://, file:///path (or a path), s3://bucket/prefix, redis://host:port/db,
  redis+cluster://host:port; options with -o KEY=VALUE (VALUE may be JSON), e.g.
  -o endpoint_url=http://localhost:9000 -o key=... -o secret=... (S3), -o prefix=app/ (Redis)

exit codes:
  0  success; everything checked is intact
  1  error: bad option, unreachable store, an object gc could not remove...
  2  usage error (bad arguments)
  3  damage found: a corrupt, missing or mismatched object (verify, inspect, ls)
  4  not found: no context matches (inspect)
"""


def from_checkout(module: str) -> Any:
    """Import ``module`` of the folders beside the package that ``kvstore bench`` and
    ``kvstore demo`` run from (``benchmarks/``, ``eval/``: part of a source checkout, not
    of the installed library), from the checkout this package was installed from (an
    editable install) or the current directory; :class:`ConfigError` where neither holds it."""
    import importlib

    top = module.partition(".")[0]
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / top / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    else:
        raise ConfigError(f"{top}/ is not installed with the library: run this command from a source "
                          "checkout of kvstore (git clone ...; pip install -e '.[all]')")
    return importlib.import_module(module)


def _cmd_bench(args: argparse.Namespace) -> int:
    run_benchmark = from_checkout("benchmarks").run_benchmark

    result = run_benchmark(args.name, quick=args.quick, model=args.model)
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
    run = from_checkout("eval.demo").run
    run(store_url=args.store, quick=args.quick, json_path=args.json, png_path=args.png,
        storage_options=_storage_options(args.option))
    return EXIT_OK


def _run_on_store(args: argparse.Namespace, action: Callable[[Any], Awaitable[Any]]) -> Any:
    """Open the store named by ``args`` on a fresh event loop, run ``action(store)``, close it."""
    from urllib.parse import urlsplit

    from kvstore.backends import local_path_from_url, open_store
    from kvstore.backends.signed import SignedStore

    if "://" not in args.url or urlsplit(args.url).scheme == "file":
        path = Path(local_path_from_url(args.url))
        if not path.is_dir():  # opening a local store would create it: not for commands that only look
            raise KVStoreError(f"no local store at {path} (not a directory)")

    keys = _signing_keys(args.key_file)

    async def run() -> Any:
        async with open_store(args.url, **_storage_options(args.option)) as store:
            return await action(store if keys is None else SignedStore(store, keys))

    return asyncio.run(run())


def _signing_keys(paths: Sequence[str]) -> Any:
    """The keys of a signed store, each read from a file (the first is the current one)."""
    from kvstore.format.signed import SigningKeys

    if not paths:
        return None
    keys = []
    for path in paths:
        try:
            keys.append(Path(path).read_bytes().strip())
        except OSError as exc:
            raise KVStoreError(f"cannot read the key file {path}: {exc}") from None
    return SigningKeys.of(keys[0], keys[1:])


def _emit(args: argparse.Namespace, report: Any) -> None:
    print(json.dumps(report.to_json(), indent=2) if args.json else report.to_text())


def _cmd_ls(args: argparse.Namespace) -> int:
    from kvstore.admin import list_contexts

    listing = _run_on_store(args, lambda store: list_contexts(store, args.namespace))
    _emit(args, listing)
    return EXIT_DAMAGED if listing.unreadable else EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from kvstore.admin import inspect_context

    report = _run_on_store(args, lambda store: inspect_context(store, args.context, args.namespace))
    _emit(args, report)
    return EXIT_OK if report.ok else EXIT_DAMAGED


def _cmd_verify(args: argparse.Namespace) -> int:
    from kvstore.admin import verify_store

    prefix = f"{args.namespace}/" if args.prefix is None else args.prefix
    report = _run_on_store(args, lambda store: verify_store(store, prefix))
    _emit(args, report)
    return EXIT_OK if report.ok else EXIT_DAMAGED


def _cmd_gc(args: argparse.Namespace) -> int:
    from kvstore.admin import collect_garbage

    report = _run_on_store(
        args, lambda store: collect_garbage(store, args.namespace, grace=args.grace, dry_run=args.dry_run)
    )
    _emit(args, report)
    return EXIT_ERROR if report.errors else EXIT_OK


def _store_parser() -> argparse.ArgumentParser:
    """The arguments every store command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("url", metavar="URL", help="the store, e.g. s3://bucket/prefix or file:///path")
    common.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a storage option (repeatable; VALUE may be JSON)")
    common.add_argument("--namespace", default="kvstore", help="the key namespace (default: kvstore)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("--key-file", action="append", default=[], metavar="PATH",
                        help="a signed store's key, read from PATH (repeatable: every key is accepted)")
    return common


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_store_commands(sub: Any) -> None:
    common = _store_parser()
    kw = {"parents": [common], "epilog": EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter}
    ls = sub.add_parser("ls", help="list the contexts in a store", **kw)
    ls.set_defaults(func=_cmd_ls)

    inspect = sub.add_parser("inspect", help="one context: chunks, levels, codecs, sizes; verify every object",
                             **kw)
    inspect.add_argument("context", metavar="CONTEXT",
                         help="a manifest key, or a unique prefix of the context hash (see ls)")
    inspect.set_defaults(func=_cmd_inspect)

    verify = sub.add_parser("verify", help="re-check every checksum and every manifest; exit 3 on damage", **kw)
    verify.add_argument("--prefix", metavar="P",
                        help="only objects whose key starts with P (default: NAMESPACE/; '' for all)")
    verify.set_defaults(func=_cmd_verify)

    gc = sub.add_parser("gc", help="remove expired objects, stale temp files and orphaned chunks/profiles", **kw)
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    gc.add_argument("--grace", type=_non_negative, default=3600.0, metavar="SECONDS",
                    help="only remove orphans and temp files at least this old (default 3600; 0: every "
                         "orphan, and temp files of writes in flight, which then fail)")
    gc.set_defaults(func=_cmd_gc)


def build_parser() -> argparse.ArgumentParser:
    try:
        benchmarks: Sequence[str] | None = from_checkout("benchmarks").BENCHMARKS
    except ConfigError:
        benchmarks = None  # an installed library without its checkout: ``bench`` explains
    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark and write its figures as JSON")
    bench.add_argument("name", choices=benchmarks)
    bench.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    bench.add_argument("--json", metavar="PATH", help="write the JSON here instead of stdout")
    bench.add_argument("--model", metavar="NAME", help="the model of a real-model benchmark (codecs, retrieval: smollm2, "
                       "gemma3-270m or a local model directory)")
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser("demo", help="store and reload a real model's KV; print sizes, times, quality")
    demo.add_argument("--store", metavar="URL", help="store URL (default: a local directory in the cache)")
    demo.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                      help="a storage option, e.g. endpoint_url=http://localhost:9000 (repeatable)")
    demo.add_argument("--quick", action="store_true", help="a shorter context (about a minute)")
    demo.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    demo.add_argument("--png", metavar="PATH", default="kvstore-demo.png", help="where to write the plot")
    demo.set_defaults(func=_cmd_demo)
    _add_store_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvstore`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except ContextNotFoundError as exc:
        print(f"kvstore: not found: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except KVStoreError as exc:
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
