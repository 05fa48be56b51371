"""`python3 -m tests.perf.bench`: the command line of the bench (see __init__.py)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tests.perf.bench.run import BenchError, Options, main


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number, 0 or more")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number, 1 or more")
    return value


def _counts(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",") if part.strip()]


def run(argv: Sequence[str] | None = None) -> int:
    bench = argparse.ArgumentParser(
        prog="python3 -m tests.perf.bench",
        description="Measure a daemon over its HTTP API: p50/p90/p99 of create, exec and "
        "destroy, execs per second at several concurrencies, and memory per idle sandbox. "
        "Without --url it starts a private daemon on a temporary directory (as root) and "
        "removes it, with everything it made, at the end.",
    )
    bench.add_argument(
        "--url",
        help="the daemon to measure: unix:///path or http://HOST:PORT "
        "[default: a private daemon of this installation]",
    )
    bench.add_argument("--token", help="bearer token for --url [SANDBOXD_TOKEN]")
    bench.add_argument("--count", type=_positive, default=200, help="samples per latency row [200]")
    bench.add_argument("--warmup", type=_count, default=5, help="untimed rounds first [5]")
    bench.add_argument(
        "--concurrency",
        type=_counts,
        default=[1, 4, 16],
        metavar="N,N,…",
        help="exec throughput at these concurrencies, each with its own sandbox [1,4,16]",
    )
    bench.add_argument(
        "--duration", type=float, default=5.0, help="seconds per concurrency level [5]"
    )
    bench.add_argument(
        "--idle",
        type=_counts,
        default=[100, 1000],
        metavar="N,N,…",
        help="measure memory with this many idle sandboxes alive; '' for none [100,1000]",
    )
    bench.add_argument(
        "--pool",
        type=_count,
        default=0,
        metavar="N",
        help="start the private daemon with --pool-size N, and measure creates that find the "
        "pool ready (the other create rows then take from it whenever it has one) [0]",
    )
    bench.add_argument(
        "--transfer-mib",
        type=_count,
        default=200,
        metavar="N",
        help="upload and download a file of N MiB of random bytes; 0 for no such row [200]",
    )
    bench.add_argument(
        "--image-mb",
        type=_count,
        default=0,
        metavar="N",
        help="add a layer of N MiB of random files to the image of the create-from-image row [0]",
    )
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    args = bench.parse_args(argv)
    options = Options(
        args.count,
        args.warmup,
        args.concurrency,
        args.duration,
        args.idle,
        pool=args.pool,
        transfer_mib=args.transfer_mib,
        image_mb=args.image_mb,
    )
    try:
        return main(args.url, args.token or os.environ.get("SANDBOXD_TOKEN"), options, args.json)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
