"""`python -m dynkernels info|bench`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built and which backends run here")
    bench = sub.add_parser("bench", help="check every op against its reference, then time it against anchors")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests)")
    size.add_argument("--full", action="store_true", help="every paper size (about 25 minutes on 2 CPU cores)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    bench.add_argument("--ops", help="comma-separated ops or families (e.g. furthest_point_sample,ball_query)")
    bench.add_argument("--out", default="bench-out", help="folder for the JSON, table and PNG (default bench-out)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import format_info

        print(format_info())
        return 0
    from .bench.runner import main as bench_main

    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
