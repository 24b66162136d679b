"""Command line: `actshift info`, `actshift bench` and `actshift ood-eval`."""
from __future__ import annotations

import argparse
import sys


def _methods(text: str) -> list[str]:
    """--methods: a comma-separated list of OOD method names."""
    from .ood.postprocessors import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        given = ", ".join(unknown) or "(none given)"
        raise argparse.ArgumentTypeError(f"unknown method(s) {given}; choose from {', '.join(METHODS)}")
    return methods


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="actshift", description="Fused activation-intervention kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build record and available backends")
    from .benchmarks.run import OPS

    bench = sub.add_parser("bench", help="run the benchmark suite and print the table",
                           description="Times each op against eager PyTorch, torch.compile and peers; prints a "
                                       "table and writes <out>/<device>.csv and a PNG plot.")
    bench.add_argument("--op", action="append", metavar="NAME",
                       help=f"only this op (repeatable; default: all): {', '.join(OPS)}")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    bench.add_argument("--out", default="benchmarks/results",
                       help="results folder (default: %(default)s, relative to the current directory): a run "
                            "writes runs/<device>-<date>.csv/.png under it")
    bench.add_argument("--update-results", action="store_true",
                       help="write <out>/<device>.csv/.png instead (the committed results)")
    ood_eval = sub.add_parser("ood-eval", help="offline OOD evaluation on scikit-learn's digits")
    ood_eval.add_argument("--seed", type=int, default=0, help="data split, noise and training seed")
    ood_eval.add_argument("--epochs", type=_positive_int, default=60, help="classifier training epochs")
    ood_eval.add_argument("--methods", type=_methods, help="comma-separated subset, e.g. energy,react,scale")
    args = parser.parse_args(argv)

    if args.command == "info":
        from .info import format_info, info

        print(format_info(info()))
        return 0
    if args.command == "ood-eval":
        from .ood import digits

        digits.main(seed=args.seed, epochs=args.epochs, methods=args.methods)
        return 0
    from .benchmarks.run import run

    return run(ops=args.op, device=args.device, quick=args.quick, out_dir=args.out, update_results=args.update_results)


if __name__ == "__main__":
    sys.exit(main())
