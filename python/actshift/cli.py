"""Command line: `actshift info` and `actshift bench`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="actshift", description="Fused activation-intervention kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build record and available backends")
    bench = sub.add_parser("bench", help="run the benchmark suite and print the table")
    bench.add_argument("--op", action="append", help="only this op (repeatable); default: all")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    bench.add_argument("--out", default="benchmarks/results", help="folder for the CSV and the plot")
    args = parser.parse_args(argv)

    if args.command == "info":
        from .info import format_info, info

        print(format_info(info()))
        return 0
    from .benchmarks.run import run

    return run(ops=args.op, device=args.device, quick=args.quick, out_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
