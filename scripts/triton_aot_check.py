"""Every Triton kernel variant the launchers pick, compiled ahead of time for sm_90 (H100/H200) with
the ptxas Triton uses: registers, spills, and approximate division. No GPU needed.

    python scripts/triton_aot_check.py [--filter SUBSTRING]

Prints one line per variant (kernel, dtype, config, registers, spill bytes, stack bytes, approximate
divisions in the PTX) and exits 1 if a variant spills beyond KNOWN_SPILLS or divides approximately
(div.full / div.approx: the kernels use tl.div_rn, see kernels/_math.py). Run with TRITON_INTERPRET unset
(tests/test_triton_gpu.py runs it in a child process)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas

from actshift.kernels import percentile as pk
from actshift.kernels import relu_ffn as rf
from actshift.kernels import sparse_linear as sl
from actshift.kernels import sparse_threshold as st
from actshift.kernels import steer as sk

TARGET = GPUTarget("cuda", 90, 32)
# The ptxas Triton itself assembles sm_90 code with.
PTXAS = get_ptxas(90).path
DTYPES = ("fp32", "bf16")  # fp16 has bf16's register footprint
TORCH_NAME = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# Variants that hold a whole row of 8192..16384 values in registers (one program per row) and spill
# at any warp count ptxas allows (16 warps caps a thread at 128 registers, 32 at 64). Measured
# spill bytes (stores + loads) on sm_90; a variant spilling more than listed, or any other variant
# spilling, fails the check.
KNOWN_SPILLS = {
    "steer_program bf16 d=8192": 16,
    "steer_program fp32 d=16384": 944,
    "steer_program bf16 d=16384": 656,  # 648 before the per-row stride arguments (issue 14)
    "percentile method=4 fp32 d=16384": 64,
    "percentile method=4 bf16 d=16384": 64,
    "adascale_stats fp32 d=16384": 216,  # 168 before top-k-only sums with NaN ordering (issue 14)
    "adascale_stats bf16 d=16384": 496,
}


def resources(fn, sig: dict, consts: dict, num_warps: int) -> dict:
    """Compiles fn for sm_90 and returns ptxas's resource usage of its PTX, and its approximate divisions."""
    sig = dict(sig, **{name: "constexpr" for name in consts})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        log = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    num = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    approx_div = len(re.findall(r"\bdiv\.(?:full|approx)\.", compiled.asm["ptx"]))
    return {"approx_div": approx_div, "regs": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def variants():
    """(name, fn, signature, constexprs, num_warps) of each variant, from the launchers' own choices."""
    import torch

    for dt in DTYPES:
        for d in (4096, 8192, 16384):
            block_d, warps = sk.program_config(d)
            yield (f"steer_program {dt} d={d}", sk._program_kernel,
                   {**{n: "*fp32" for n in ("mon_ptr", "scalars_ptr", "ablate_ptr", "targets_ptr", "affine_ptr",
                                            "vectors_ptr", "weights_ptr", "nval_ptr", "cond_ptr", "monitor_ptr",
                                            "gate_ptr", "roww_ptr")},
                    "x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "meta_ptr": "*i32", "nidx_ptr": "*i32", "slot_ptr": "*i64",
                    **{n: "i32" for n in ("d", "x_stride", "y_stride", "gate_stride", "slot_stride", "roww_stride",
                                          "S", "K", "M", "N", "P")}},
                   {"HAS_GATE": True, "HAS_SLOT": True, "HAS_ROW_W": True, "HAS_AFFINE": True, "HAS_COND": True,
                    "HAS_MON": True, "IN_PLACE": False, "BLOCK_D": block_d, "BLOCK_N": 64, "BLOCK_P": 16}, warps)
        for d in (8192, 16384):
            block_d, warps = pk._launch_config(d)
            for method in (4,):  # ash_s: scale's work plus the kept mask
                yield (f"percentile method={method} {dt} d={d}", pk._percentile_kernel,
                       {"z_ptr": f"*{dt}", "k_ptr": "*i32", "y_ptr": f"*{dt}", "r_ptr": "*fp32", "d": "i32",
                        "clip": "fp32"}, {"METHOD": method, "HAS_CLIP": True, "BLOCK_D": block_d}, warps)
            yield (f"adascale_stats {dt} d={d}", pk._adascale_stats_kernel,
                   {"z_ptr": f"*{dt}", "zp_ptr": f"*{dt}", "q_ptr": "*fp32", "c_ptr": "*fp32", "d": "i32", "k1": "i32",
                    "k2": "i32"}, {"BLOCK_D": block_d}, warps)
        # sparse_linear over x of dtype dt, and relu_ffn's down projection over its fp32 h.
        for x_dt, mode in ((dt, 2), ("fp32", 0)):
            for rows in (1, 2, 17):
                if mode == 2 and rows > sl.MAX_SPARSE_ROWS:
                    continue
                block_r, block_n, dot, warps = sl._tiles(rows, getattr(torch, TORCH_NAME[x_dt]))
                yield (f"splitk x={x_dt} w={dt} rows={rows}", sl._splitk_kernel,
                       {"x_ptr": f"*{x_dt}", "w_ptr": f"*{dt}", "t_ptr": "*fp32", "ws_ptr": "*fp32", "rows": "i32",
                        "k_dim": "i32", "n_dim": "i32", "x_stride": "i32", "k_blocks_per_program": "i32"},
                       {"MODE": mode, "BLOCK_R": block_r, "BLOCK_K": sl._BLOCK_K, "BLOCK_N": block_n, "USE_DOT": dot},
                       warps)
        # Inductor passes the float threshold as fp64, eager Triton as fp32.
        for act, gated, t_dt in ((4, True, "fp64"), (2, False, "fp32")):
            for rows in (1, 8, 9):
                block_r, block_f, block_d, dot, warps = rf._tiles(rows, getattr(torch, TORCH_NAME[dt]))
                yield (f"gate_up act={act} {dt} rows={rows}", rf._gate_up_kernel,
                       {"x_ptr": f"*{dt}", "wg_ptr": f"*{dt}", "wu_ptr": f"*{dt}", "bg_ptr": f"*{dt}",
                        "bu_ptr": f"*{dt}", "h_ptr": "*fp32", "rows": "i32", "d": "i32", "ffn": "i32",
                        "x_stride": "i32", "threshold": t_dt},
                       {"ACT": act, "GATED": gated, "HAS_B_GATE": True, "HAS_B_UP": gated, "BLOCK_R": block_r,
                        "BLOCK_F": block_f, "BLOCK_D": block_d, "USE_DOT": dot}, warps)
        yield (f"finalize {dt}", sl._finalize_kernel,
               {"ws_ptr": "*fp32", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}", "n_dim": "i32"},
               {"HAS_BIAS": True, "BLOCK_N": 1024}, 4)
        yield (f"steer {dt}", sk._steer_kernel,
               {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "vectors_ptr": "*fp32", "weights_ptr": "*fp32",
                "strength_ptr": "*fp32", "gate_ptr": "*fp32", "slot_ptr": "*i64", "d": "i32", "x_stride": "i32",
                "y_stride": "i32", "gate_stride": "i32", "slot_stride": "i32", "m": "i32", "num_plans": "i32"},
               {"HAS_GATE": True, "HAS_SLOT": True, "IN_PLACE": False, "BLOCK_D": sk._MAX_BLOCK_D}, 4)
        yield (f"sparse_threshold {dt}", st._sparse_threshold_kernel,
               {"x_ptr": f"*{dt}", "t_ptr": "*fp32", "y_ptr": f"*{dt}", "n": "i32", "x_stride": "i32"},
               {"PER_CHANNEL": True, "BLOCK_N": 1024}, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="", help="only variants whose name contains this")
    args = parser.parse_args()
    failed = []
    for name, fn, sig, consts, warps in variants():
        if args.filter not in name:
            continue
        r = resources(fn, sig, consts, warps)
        spills = r["spill_stores"] + r["spill_loads"]
        print(f"{name:40s} warps={warps:2d} regs={r['regs']:3d} spill={spills:5d} B stack={r['stack']:5d} B "
              f"approx_div={r['approx_div']}", flush=True)
        if spills > KNOWN_SPILLS.get(name, 0) or r["approx_div"]:
            failed.append(name)
    if failed:
        print(f"FAILED (spills or approximate division) in {len(failed)} variant(s): {', '.join(failed)}")
        return 1
    print("no spills beyond KNOWN_SPILLS, no approximate division")
    return 0


if __name__ == "__main__":
    sys.exit(main())
