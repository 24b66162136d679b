"""`actshift bench`: runs the selected ops' cases, prints a table, and writes the run's CSV and plot to
<out>/runs/<device>-<date>.csv/.png; with update_results, to the committed <out>/<device>.csv/.png."""
from __future__ import annotations

import os
import sys

import torch

from . import bench_percentile, bench_steer
from . import bench_decode  # decode tokens/s of a patched model
from . import bench_relu_ffn, bench_sparse_decode, bench_sparse_linear  # sparse ops
from . import bench_route  # MoE router
from . import bench_vllm  # stock vLLM with the actshift plugin
from .harness import Result, Timer, derived, environment, noisy_providers, plot, table, write_csv

OPS = {"steer": bench_steer, "percentile": bench_percentile}
OPS["decode"] = bench_decode
OPS.update({"sparse_linear": bench_sparse_linear, "relu_ffn": bench_relu_ffn, "sparse_decode": bench_sparse_decode})
OPS["vllm"] = bench_vllm  # needs vLLM (.venv-vllm); skipped without it
OPS["route"] = bench_route


def run(ops: list[str] | None, device: str | None, quick: bool, out_dir: str, update_results: bool = False) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("actshift bench: --device cuda needs a CUDA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        print(f"actshift bench: unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}", file=sys.stderr)
        return 2
    env = environment(device)
    print(f"actshift bench on {env['device_name']} ({device}, {env['threads']} threads), torch {env['torch']}, "
          f"git {env['git_sha']}{' (quick)' if quick else ''}", flush=True)
    # A run goes to its own file; the committed results change only when asked to.
    run_dir = out_dir if update_results else os.path.join(out_dir, "runs")
    stem = device if update_results else f"{device}-{env['date'].replace(':', '')}"
    os.makedirs(run_dir, exist_ok=True)
    csv_path = os.path.join(run_dir, f"{stem}.csv")
    timer = Timer(device, quick)
    results: list[Result] = []
    for name in ops or OPS:
        for case in OPS[name].cases(device, quick):
            print(f"  {case.op} {case.case} {case.shape} {str(case.dtype).replace('torch.', '')}", flush=True)
            measured = [Result(case, p, *t) for p, t in timer.measure(case.providers).items()]
            noisy = noisy_providers(measured)
            if noisy:  # once more; if still too wide, derived() marks the case's ratios noisy
                print(f"    p20-p80 spread too wide for {', '.join(noisy)}: measuring again", flush=True)
                measured = [Result(case, p, *t) for p, t in timer.measure(case.providers).items()]
            results += measured
            case.providers.clear()  # free the case's tensors and compiled graphs
            # Rewritten after every case, so a run stopped by a time limit keeps what it measured.
            derived(measured, env["device_name"])
            write_csv(csv_path, results, env)
    print()
    print(table(results))
    for name in ops or OPS:  # ops that report more than the table (e.g. decode tokens/s)
        if hasattr(OPS[name], "summary"):
            print(OPS[name].summary(results))
    png_path = os.path.join(run_dir, f"{stem}.png")
    title = f"actshift {env['actshift']} on {env['device_name']}, torch {env['torch']}, {env['git_sha']}, {env['date']}"
    wrote_png = plot(png_path, results, title)
    print(f"\nwrote {csv_path}" + (f" and {png_path}" if wrote_png else " (no plot: matplotlib missing)"))
    return 0
