"""Timing, result records, CSV/plot/table output shared by every op's benchmark.

Each op module (bench_<op>.py) yields `Case`s: one shape and feature set, with named providers (the
eager composition a user would write, its torch.compile, a copy of the input as the bandwidth floor,
and each actshift backend). All providers of a case are timed in the same run, interleaved, so
ratios compare like with like. The ideal speedup is the ratio of bytes moved (eager / actshift) for
a memory-bound op; percent of ideal = measured speedup / ideal speedup.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

EAGER, COMPILE, COPY = "eager", "torch.compile", "copy"


@dataclass
class Case:
    op: str
    case: str  # feature set, e.g. "add" or "add+gate+slot"
    shape: str  # e.g. "rows=4096 d=4096"
    dtype: torch.dtype
    providers: dict[str, Callable[[], object]]
    bytes_actshift: int  # bytes an ideal fused kernel moves
    bytes_eager: int  # bytes the eager composition moves
    note: str = ""
    peer: str | None = None  # a second baseline provider reported as speedup_vs_peer


@dataclass
class Result:
    case: Case
    provider: str
    median_us: float
    p20_us: float
    p80_us: float
    extra: dict = field(default_factory=dict)


def dtypes(device: str) -> list[torch.dtype]:
    """fp32 on CPU; the half types on GPU, where models run them."""
    return [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16]


def our_backends(device: str) -> list[str]:
    """The actshift backends (beside the reference) that run on `device` here."""
    from actshift import backends

    dev = torch.device(device)
    return [b for b in ("cpu", "cuda", "triton") if not backends.unavailable_reason(b, dev)]


def compiled(fn: Callable[[], object]) -> Callable[[], object]:
    """torch.compile of a provider (static shapes: each case is one shape)."""
    return torch.compile(fn, dynamic=False)


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]

    return q(0.5), q(0.2), q(0.8)


class Timer:
    """Median/p20/p80 of repeated calls. CPU: wall clock per call. CUDA: events per call with the
    L2 cache flushed before each (as triton.testing.do_bench does), so small shapes are not timed
    from cache."""

    def __init__(self, device: str, quick: bool):
        self.device = device
        self.budget_s = 0.15 if quick else 0.5  # time spent per provider after warm-up
        self.min_reps, self.max_reps = (5, 200) if quick else (10, 2000)
        self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if device == "cuda" else None

    ROUNDS = 5  # providers alternate in rounds, so a slow drift of the machine hits all of them

    def measure(self, providers: dict[str, Callable[[], object]]) -> dict[str, tuple[float, float, float]]:
        """Median, p20, p80 in microseconds of each provider, measured side by side."""
        reps = {}
        for name, fn in providers.items():
            for _ in range(3):  # warm-up; the first call of a torch.compile provider compiles
                fn()
            self._sync()
            t0 = time.perf_counter()
            fn()
            self._sync()
            once = max(time.perf_counter() - t0, 1e-7)
            reps[name] = int(min(self.max_reps, max(self.min_reps, self.budget_s / once)) // self.ROUNDS + 1)
        samples: dict[str, list[float]] = {name: [] for name in providers}
        for _ in range(self.ROUNDS):
            for name, fn in providers.items():
                samples[name] += [self._time_one(fn) for _ in range(reps[name])]
        return {name: _quantiles(s) for name, s in samples.items()}

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _time_one(self, fn) -> float:
        if self.device != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6
        self._flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3


def environment(device: str) -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    if sha != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
        sha += "-dirty"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    from actshift import __version__

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_name()
    return {
        "device": device,
        "device_name": name,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "actshift": __version__,
        "git_sha": sha,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def derived(results: list[Result]) -> None:
    """Fills speedups (vs eager, vs torch.compile), ratio to copy, ideal and percent of ideal."""
    by_case: dict[int, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(id(r.case), {})[r.provider] = r
    for group in by_case.values():
        eager, comp, copy = group.get(EAGER), group.get(COMPILE), group.get(COPY)
        for r in group.values():
            c = r.case
            ideal = c.bytes_eager / c.bytes_actshift
            r.extra["ideal_speedup"] = ideal
            r.extra["gbps"] = c.bytes_actshift / (r.median_us * 1e-6) / 1e9 if r.provider.startswith("actshift") else None
            if eager:
                r.extra["speedup_vs_eager"] = eager.median_us / r.median_us
                r.extra["pct_of_ideal"] = 100 * r.extra["speedup_vs_eager"] / ideal
            if comp:
                r.extra["speedup_vs_compile"] = comp.median_us / r.median_us
            if copy:
                r.extra["x_copy_time"] = r.median_us / copy.median_us
            if c.peer and c.peer in group:
                r.extra["speedup_vs_peer"] = group[c.peer].median_us / r.median_us


COLUMNS = [
    "op", "case", "shape", "dtype", "provider", "median_us", "p20_us", "p80_us", "speedup_vs_eager",
    "speedup_vs_compile", "speedup_vs_peer", "x_copy_time", "ideal_speedup", "pct_of_ideal", "gbps", "note",
    "device", "device_name", "threads", "torch", "triton", "actshift", "git_sha", "date",
]


def write_csv(path: str, results: list[Result], env: dict[str, str]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in results:
            row = {"op": r.case.op, "case": r.case.case, "shape": r.case.shape, "dtype": str(r.case.dtype).replace("torch.", ""),
                   "provider": r.provider, "median_us": f"{r.median_us:.2f}", "p20_us": f"{r.p20_us:.2f}",
                   "p80_us": f"{r.p80_us:.2f}", "note": r.case.note, **env}
            for k, v in r.extra.items():
                row[k] = "" if v is None else f"{v:.3f}"
            w.writerow(row)


def _fmt(v, spec: str) -> str:
    return format("-", spec.rstrip("f").split(".")[0]) if v is None else format(v, spec)


def table(results: list[Result]) -> str:
    """One line per (case, provider); the actshift lines carry the ratios."""
    head = f"{'op':<17}{'case':<15}{'shape':<20}{'dtype':<9}{'provider':<18}{'median us':>11}{'p20':>10}{'p80':>10}" \
           f"{'vs eager':>9}{'vs comp':>8}{'vs peer':>8}{'/copy':>7}{'ideal':>7}{'%ideal':>7}"
    lines = [head, "-" * len(head)]
    last = None
    for r in results:
        key = (r.case.op, r.case.case, r.case.shape, r.case.dtype)
        if last is not None and key != last:
            lines.append("")
        last = key
        ours = r.provider.startswith("actshift")
        e = r.extra
        lines.append(
            f"{r.case.op:<17}{r.case.case:<15}{r.case.shape:<20}{str(r.case.dtype).replace('torch.', ''):<9}{r.provider:<18}"
            f"{r.median_us:>11.1f}{r.p20_us:>10.1f}{r.p80_us:>10.1f}"
            f"{_fmt(e.get('speedup_vs_eager') if ours else None, '>9.2f')}{_fmt(e.get('speedup_vs_compile') if ours else None, '>8.2f')}"
            f"{_fmt(e.get('speedup_vs_peer') if ours else None, '>8.2f')}"
            f"{_fmt(e.get('x_copy_time') if ours else None, '>7.2f')}{_fmt(e.get('ideal_speedup') if ours else None, '>7.2f')}"
            f"{_fmt(e.get('pct_of_ideal') if ours else None, '>7.0f')}"
        )
    return "\n".join(lines)


def plot(path: str, results: list[Result], title: str) -> bool:
    """Speedup over eager per case and shape for each actshift provider (and torch.compile), with
    the ideal marked. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups: dict[tuple, dict[str, Result]] = {}
    for r in results:
        groups.setdefault((r.case.op, r.case.case, r.case.shape, str(r.case.dtype).replace("torch.", "")), {})[r.provider] = r
    providers = sorted({p for g in groups.values() for p in g if p.startswith("actshift") or p == COMPILE})
    labels = [" ".join(k) for k in groups]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(labels) + 3), 5.5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs = [j + i * width for j in range(len(labels))]
        ys = [g[p].extra.get("speedup_vs_eager", 0) if p in g else 0 for g in groups.values()]
        ax.bar(xs, ys, width, label=p)
    ideals = [next(iter(g.values())).extra.get("ideal_speedup", 0) for g in groups.values()]
    ax.scatter([j + 0.4 - width / 2 for j in range(len(labels))], ideals, marker="_", s=300, color="black", label="ideal (bytes)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")  # speedups span 0.2x to 40x
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over eager (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
