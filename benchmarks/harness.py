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
    bytes_copy: int | None = None  # bytes the COPY provider moves (its achieved GB/s is the ceiling)


@dataclass
class Result:
    case: Case
    provider: str
    median_us: float
    p20_us: float
    p80_us: float
    extra: dict = field(default_factory=dict)

    @property
    def spread(self) -> float:
        return relative_spread(self.median_us, self.p20_us, self.p80_us)


# A ratio of two medians is reported only when both providers' p20-p80 spreads are at most this
# fraction of their medians; wider, the case is re-measured once and then marked noisy.
MAX_SPREAD = 0.3


def relative_spread(median: float, p20: float, p80: float) -> float:
    """(p80 - p20) / median: how wide a provider's timing distribution is."""
    return (p80 - p20) / median if median > 0 else float("inf")


def ratio_supported(a: tuple[float, float, float], b: tuple[float, float, float], max_spread: float = MAX_SPREAD) -> bool:
    """Whether the ratio of the medians of a and b, each (median, p20, p80), is a result: both
    spreads are at most max_spread of their medians."""
    return relative_spread(*a) <= max_spread and relative_spread(*b) <= max_spread


def medians_differ(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether a and b, each (median, p20, p80), differ beyond their spreads: their p20-p80 ranges
    do not overlap. False means the measurement cannot tell them apart."""
    return a[2] < b[1] or b[2] < a[1]


def dtypes(device: str, quick: bool = False) -> list[torch.dtype]:
    """fp32 on CPU; the half types on GPU, where models run them (quick: bf16 alone, as many bytes
    as fp16 for half the torch.compile and Triton compiles)."""
    if device == "cpu":
        return [torch.float32]
    return [torch.bfloat16] if quick else [torch.float16, torch.bfloat16]


def our_backends(device: str) -> list[str]:
    """The actshift backends (beside the reference) that run on `device` here."""
    from actshift import backends

    dev = torch.device(device)
    return [b for b in ("cpu", "cuda", "triton") if not backends.unavailable_reason(b, dev)]


def compiled(fn: Callable[[], object]) -> Callable[[], object]:
    """torch.compile of a provider, compiled for its own case's shape.

    Cases build their providers from the same few functions, so one dynamo cache would collect a
    guard per shape and, past its recompile_limit (8), silently run eager code in every later
    "torch.compile" column. Dynamo is reset per case instead (the previous case is done by the
    time the next one is built), and Timer.measure checks that the provider compiled a graph."""
    torch._dynamo.reset()
    compiled_fn = torch.compile(fn, dynamic=False)
    compiled_fn.actshift_compiled = True
    return compiled_fn


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


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
            graphs = _graphs_compiled()
            for _ in range(3):  # warm-up; the first call of a torch.compile provider compiles
                fn()
            if getattr(fn, "actshift_compiled", False) and not getattr(fn, "actshift_checked", False):
                if _graphs_compiled() == graphs:
                    raise RuntimeError(f"provider {name!r} compiled no graph: dynamo ran it as eager code")
                fn.actshift_checked = True
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


# Peak HBM bandwidth (GB/s) by device-name fragment, most specific first (vendor data sheets).
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
             ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("A10G", 600.0))


def peak_gbps(device_name: str) -> float | None:
    return next((gbps for key, gbps in PEAK_GBPS if key in device_name), None)


def noisy_providers(results: list[Result], max_spread: float = MAX_SPREAD) -> list[str]:
    """The providers of one case's results whose spread is too wide to support a ratio."""
    return [r.provider for r in results if r.spread > max_spread]


def derived(results: list[Result], device_name: str = "") -> None:
    """Fills speedups (vs eager, vs torch.compile), ratio to copy, ideal and percent of ideal,
    achieved GB/s with its percent of the same run's copy_ and of the device's peak, and `noisy`:
    the providers of the case whose spread makes their ratios no result."""
    peak = peak_gbps(device_name)
    by_case: dict[int, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(id(r.case), {})[r.provider] = r
    for group in by_case.values():
        eager, comp, copy = group.get(EAGER), group.get(COMPILE), group.get(COPY)
        noisy = noisy_providers(list(group.values()))
        copy_gbps = None
        if copy and copy.case.bytes_copy:
            copy_gbps = copy.case.bytes_copy / (copy.median_us * 1e-6) / 1e9
        for r in group.values():
            c = r.case
            ideal = c.bytes_eager / c.bytes_actshift
            r.extra["ideal_speedup"] = ideal
            r.extra["noisy"] = noisy
            ours = r.provider.startswith("actshift")
            gbps = c.bytes_actshift / (r.median_us * 1e-6) / 1e9 if ours else None
            r.extra["gbps"] = gbps
            r.extra["pct_copy_bw"] = 100 * gbps / copy_gbps if gbps and copy_gbps else None
            r.extra["pct_peak_bw"] = 100 * gbps / peak if gbps and peak else None
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
    "speedup_vs_compile", "speedup_vs_peer", "x_copy_time", "ideal_speedup", "pct_of_ideal", "gbps", "pct_copy_bw",
    "pct_peak_bw", "noisy", "note", "device", "device_name", "threads", "torch", "triton", "actshift", "git_sha", "date",
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
                if k == "noisy":
                    row[k] = " ".join(v)
                else:
                    row[k] = "" if v is None else f"{v:.3f}"
            w.writerow(row)


def _fmt(v, spec: str) -> str:
    return format("-", spec.rstrip("f").split(".")[0]) if v is None else format(v, spec)


def _ratio(r: Result, key: str, baseline: str | None, spec: str) -> str:
    """A ratio column of the table: '-' when absent, 'noisy' when either side's spread is too wide."""
    v = r.extra.get(key)
    if v is not None and (r.provider in r.extra.get("noisy", ()) or baseline in r.extra.get("noisy", ())):
        return format("noisy", spec.rstrip("f").split(".")[0])
    return _fmt(v, spec)


def table(results: list[Result]) -> str:
    """One line per (case, provider); the actshift lines carry the ratios ('noisy' where the p20-p80
    spread of either side is too wide to support one)."""
    head = f"{'op':<17}{'case':<15}{'shape':<20}{'dtype':<9}{'provider':<18}{'median us':>11}{'p20':>10}{'p80':>10}" \
           f"{'vs eager':>9}{'vs comp':>8}{'vs peer':>8}{'/copy':>7}{'ideal':>7}{'%ideal':>7}{'%bw':>6}"
    lines = [head, "-" * len(head)]
    last = None
    for r in results:
        key = (r.case.op, r.case.case, r.case.shape, r.case.dtype)
        if last is not None and key != last:
            lines.append("")
        last = key
        e = r.extra if r.provider.startswith("actshift") else {}
        lines.append(
            f"{r.case.op:<17}{r.case.case:<15}{r.case.shape:<20}{str(r.case.dtype).replace('torch.', ''):<9}{r.provider:<18}"
            f"{r.median_us:>11.1f}{r.p20_us:>10.1f}{r.p80_us:>10.1f}"
            f"{_ratio(r, 'speedup_vs_eager', EAGER, '>9.2f') if e else _fmt(None, '>9')}"
            f"{_ratio(r, 'speedup_vs_compile', COMPILE, '>8.2f') if e else _fmt(None, '>8')}"
            f"{_ratio(r, 'speedup_vs_peer', r.case.peer, '>8.2f') if e else _fmt(None, '>8')}"
            f"{_ratio(r, 'x_copy_time', COPY, '>7.2f') if e else _fmt(None, '>7')}{_fmt(e.get('ideal_speedup'), '>7.2f')}"
            f"{_ratio(r, 'pct_of_ideal', EAGER, '>7.0f') if e else _fmt(None, '>7')}"
            f"{_ratio(r, 'pct_copy_bw', COPY, '>6.0f') if e else _fmt(None, '>6')}"
        )
    return "\n".join(lines)


def plot(path: str, results: list[Result], title: str) -> bool:
    """One row of panels per op: left, the speedup over eager of each actshift provider and of
    torch.compile per case and shape, with the ideal (bytes) marked; right, the actshift providers'
    bandwidth as % of the same run's copy_ (and of the device peak where known). Noisy ratios are
    hatched. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ops: dict[str, dict[tuple, dict[str, Result]]] = {}
    several_dtypes = len({r.case.dtype for r in results}) > 1
    for r in results:
        label = (r.case.case, r.case.shape) + ((str(r.case.dtype).replace("torch.", ""),) if several_dtypes else ())
        ops.setdefault(r.case.op, {}).setdefault(label, {})[r.provider] = r
    widest = max((len(g) for g in ops.values()), default=1)
    fig, axes = plt.subplots(len(ops), 2, figsize=(max(16, 0.45 * widest * 5 / 3), 4.8 * len(ops)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (op, groups) in enumerate(ops.items()):
        labels = [" ".join(k) for k in groups]
        names = sorted({p for g in groups.values() for p in g if p.startswith("actshift") or p == COMPILE})
        ours = [p for p in names if p.startswith("actshift")]
        for ax, shown, key in ((axes[row][0], names, "speedup_vs_eager"), (axes[row][1], ours, "pct_copy_bw")):
            width = 0.8 / max(1, len(shown))
            baseline = EAGER if key == "speedup_vs_eager" else COPY
            for i, p in enumerate(shown):
                labelled = False
                for j, g in enumerate(groups.values()):
                    v = g[p].extra.get(key) if p in g else None
                    if not v:
                        continue
                    noisy = {p, baseline} & set(g[p].extra.get("noisy", ()))
                    ax.bar(j + i * width, v, width, color=colors[names.index(p) % len(colors)],
                           hatch="//" if noisy else None, label=None if labelled else p)
                    labelled = True
            centers = [j + 0.4 - width / 2 for j in range(len(labels))]
            ax.set_xticks(centers)
            ax.set_xticklabels(labels, fontsize=7, rotation=50, ha="right")
            ax.grid(axis="y", alpha=0.3)
        ax = axes[row][0]
        ideals = [next(iter(g.values())).extra.get("ideal_speedup", 0) for g in groups.values()]
        ax.scatter(centers if labels else [], ideals, marker="_", s=400, color="black", label="ideal (bytes)", zorder=3)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup over eager (x)")
        ax.set_title(f"{op}: speedup (hatched: p20-p80 spread too wide)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[row][1]
        if not any(g[p].extra.get("pct_copy_bw") for g in groups.values() for p in g if p in ours):
            ax.axis("off")
            ax.text(0.5, 0.5, f"{op}: no copy_ baseline in these cases", ha="center", va="center", fontsize=9)
            continue
        ax.axhline(100.0, color="grey", lw=0.8)
        ax.set_ylabel("% of copy_ bandwidth")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"{op}: bytes/s of the fused kernel as % of the same run's copy_", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
