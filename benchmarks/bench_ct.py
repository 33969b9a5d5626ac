"""CT projector speed and memory: recon against deepinv's Tomography and ASTRA's CPU projectors.

Run on an otherwise idle machine:

    python benchmarks/bench_ct.py            # prints Markdown tables (paste into benchmarks/README.md)
    python benchmarks/bench_ct.py --quick    # fewer repetitions

Timings are the median of ``--repeat`` runs after one warm-up call (which builds recon's sparse matrix
and deepinv's grids); the one-off build/construction time is reported separately. Peak memory is the
maximum resident set size of a fresh subprocess that builds the operator and runs A and A^T once.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_recon(n, views, batch, repeat, matrix_memory=None):
    from recon.operators import ParallelBeamCT

    kw = {} if matrix_memory is None else {"matrix_memory": matrix_memory}
    t0 = time.perf_counter()
    op = ParallelBeamCT((n, n), angles=views, **kw)
    construct = time.perf_counter() - t0
    x = torch.rand(batch, 1, n, n)
    t0 = time.perf_counter()
    y = op.A(x)
    first = time.perf_counter() - t0
    fwd = timeit(lambda: op.A(x), repeat)
    adj = timeit(lambda: op.A_adjoint(y), repeat)
    return {"construct": construct, "first_call": first, "A": fwd, "AT": adj}


def bench_deepinv(n, views, batch, repeat, adjoint_via_backprop=True):
    import deepinv

    t0 = time.perf_counter()
    op = deepinv.physics.Tomography(
        angles=views, img_width=n, circle=False, normalize=False, adjoint_via_backprop=adjoint_via_backprop
    )
    construct = time.perf_counter() - t0
    x = torch.rand(batch, 1, n, n)
    y = op.A(x)
    fwd = timeit(lambda: op.A(x), repeat)
    adj = timeit(lambda: op.A_adjoint(y), repeat)
    return {"construct": construct, "A": fwd, "AT": adj}


def bench_astra(n, views, batch, repeat, fan=False):
    import astra
    import numpy as np

    vol = astra.create_vol_geom(n, n)
    angles = np.linspace(0, np.pi if not fan else 2 * np.pi, views, endpoint=False)
    if fan:
        n_det = 2 * math.ceil(2 * n * math.sqrt(2) * math.tan(math.asin(0.25)) / 1.0) + 1
        proj = astra.create_proj_geom("fanflat", 1.0, n_det, angles, 2 * n * math.sqrt(2), 2 * n * math.sqrt(2))
        pid = astra.create_projector("line_fanflat", proj, vol)
    else:
        n_det = 2 * math.ceil(n * math.sqrt(2) / 2) + 1
        proj = astra.create_proj_geom("parallel", 1.0, n_det, angles)
        pid = astra.create_projector("linear", proj, vol)
    t0 = time.perf_counter()
    W = astra.OpTomo(pid)
    construct = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    xs = [rng.random((n, n), dtype=np.float32) for _ in range(batch)]
    ys = [W.FP(x) for x in xs]
    fwd = timeit(lambda: [W.FP(x) for x in xs], repeat)  # ASTRA has no batch: one call per image
    adj = timeit(lambda: [W.BP(y) for y in ys], repeat)
    astra.projector.delete(pid)
    return {"construct": construct, "A": fwd, "AT": adj}


def bench_recon_fan(n, views, batch, repeat):
    from recon.operators import FanBeamCT

    op = FanBeamCT((n, n), angles=views)
    x = torch.rand(batch, 1, n, n)
    t0 = time.perf_counter()
    y = op.A(x)
    first = time.perf_counter() - t0
    return {"first_call": first, "A": timeit(lambda: op.A(x), repeat), "AT": timeit(lambda: op.A_adjoint(y), repeat)}


def bench_recon_cone(n, views, repeat):
    from recon.operators import ConeBeamCT

    op = ConeBeamCT((n, n, n), angles=views)
    x = torch.rand(1, 1, n, n, n)
    t0 = time.perf_counter()
    y = op.A(x)
    first = time.perf_counter() - t0
    return {
        "first_call": first,
        "A": timeit(lambda: op.A(x), repeat),
        "AT": timeit(lambda: op.A_adjoint(y), repeat),
        "FDK": timeit(lambda: op.fbp(y), max(1, repeat // 2)),
        "detector": op.detector_shape,
        "matrix": op.table.fully_cached,
    }


# VmHWM (peak RSS of this process image) rather than ru_maxrss, which on Linux keeps the parent's
# peak across fork+exec and would report the benchmark driver's memory instead of the child's.
_MEMORY_CHILD = """
import sys, time, torch, warnings
warnings.filterwarnings("ignore")
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from recon.operators import ParallelBeamCT
n, views, budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
base = hwm()
op = ParallelBeamCT((n, n), angles=views, matrix_memory=budget)
x = torch.rand(1, 1, n, n)
t0 = time.perf_counter(); y = op.A(x); t1 = time.perf_counter(); z = op.A_adjoint(y); t2 = time.perf_counter()
y = op.A(x); t3 = time.perf_counter(); z = op.A_adjoint(y); t4 = time.perf_counter()
print(hwm(), base, op.table.kept_bytes / 2**20, t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""


def peak_memory(n, views, budget):
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(n), str(views), str(budget)],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    keys = ["peak_MiB", "import_MiB", "matrix_MiB", "first_A", "first_AT", "A", "AT"]
    return dict(zip(keys, map(float, out), strict=True))


def ms(t):
    return f"{1000 * t:.0f} ms" if t < 10 else f"{t:.1f} s"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", help="also write raw numbers here")
    args = parser.parse_args()
    repeat = 3 if args.quick else args.repeat
    n, views = 256, 180
    results: dict = {"torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}

    threads = results["torch_threads"]
    print(f"## 2D parallel beam, {n}×{n}, {views} views, batch 1 (median of {repeat}, {threads} threads)\n")
    rows = {
        "recon ParallelBeamCT (sparse matrix, default)": bench_recon(n, views, 1, repeat),
        "recon ParallelBeamCT (matrix-free, matrix_memory=0)": bench_recon(n, views, 1, max(1, repeat // 2), 0.0),
        "deepinv Tomography (adjoint_via_backprop=True: exact adjoint)": bench_deepinv(n, views, 1, repeat),
        "deepinv Tomography (adjoint_via_backprop=False: inexact adjoint)": bench_deepinv(n, views, 1, repeat, False),
    }
    try:
        rows["ASTRA 2.5 CPU `linear` (OpTomo FP/BP)"] = bench_astra(n, views, 1, repeat)
    except ImportError:
        print("(astra-toolbox not installed: `pip install astra-toolbox` to include it)\n")
    results["parallel"] = rows
    print("| operator | A | Aᵀ | A + Aᵀ | construction | first call |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        first = ms(r["first_call"]) if "first_call" in r else "–"
        print(f"| {name} | {ms(r['A'])} | {ms(r['AT'])} | {ms(r['A'] + r['AT'])} | {ms(r['construct'])} | {first} |")
    ours = rows["recon ParallelBeamCT (sparse matrix, default)"]
    dinv = rows["deepinv Tomography (adjoint_via_backprop=True: exact adjoint)"]
    pair = ours["A"] + ours["AT"]
    print(f"\nrecon / deepinv (exact adjoint), A + Aᵀ: **{pair / (dinv['A'] + dinv['AT']):.3f}** (target ≤ 0.25)")
    if "ASTRA 2.5 CPU `linear` (OpTomo FP/BP)" in rows:
        astra_pair = rows["ASTRA 2.5 CPU `linear` (OpTomo FP/BP)"]
        print(f"recon / ASTRA CPU linear, A + Aᵀ: **{pair / (astra_pair['A'] + astra_pair['AT']):.3f}** (target ≤ 1)")

    print(f"\n## Batch scaling, {n}×{n}, {views} views (A + Aᵀ per call; linear scaling = batch × batch-1 time)\n")
    print("| batch | recon | recon per image | deepinv (exact adjoint) | deepinv per image |\n|---|---|---|---|---|")
    results["batch"] = {}
    for b in (1, 2, 4, 8):
        r = bench_recon(n, views, b, repeat)
        d = bench_deepinv(n, views, b, max(1, repeat // 2))
        results["batch"][b] = {"recon": r, "deepinv": d}
        rt, dt = r["A"] + r["AT"], d["A"] + d["AT"]
        print(f"| {b} | {ms(rt)} | {ms(rt / b)} | {ms(dt)} | {ms(dt / b)} |")

    print("\n## Fan beam (flat detector) and cone beam\n")
    print("| geometry | A | Aᵀ | first call (matrix build) | note |\n|---|---|---|---|---|")
    fan = bench_recon_fan(n, 360, 1, repeat)
    print(f"| recon FanBeamCT {n}², 360 views | {ms(fan['A'])} | {ms(fan['AT'])} | {ms(fan['first_call'])} | |")
    try:
        af = bench_astra(n, 360, 1, repeat, fan=True)
        print(f"| ASTRA CPU `line_fanflat` {n}², 360 views | {ms(af['A'])} | {ms(af['AT'])} | – | |")
    except ImportError:
        pass
    cone = bench_recon_cone(64, 90, max(1, repeat // 2))
    rows_, cols_ = cone["detector"]
    print(
        f"| recon ConeBeamCT 64³, 90 views, {rows_}×{cols_} detector | {ms(cone['A'])} | {ms(cone['AT'])} | "
        f"{ms(cone['first_call'])} | FDK {ms(cone['FDK'])}; sparse matrix: {cone['matrix']} |"
    )
    results["fan"], results["cone"] = fan, cone

    print("\n## Memory: 512×512, 720 views (fresh process; peak resident memory)\n")
    print("| matrix_memory | kept matrix | peak RSS (after imports) | first A / Aᵀ | A | Aᵀ |")
    print("|---|---|---|---|---|---|")
    results["memory"] = {}
    for budget, label in ((1.5e9, "1.5e9 (default)"), (0.0, "0 (matrix-free)"), (1e11, "1e11 (whole matrix)")):
        m = peak_memory(512, 720, budget)
        results["memory"][label] = m
        print(
            f"| {label} | {m['matrix_MiB']:.0f} MiB | {m['peak_MiB']:.0f} MiB ({m['import_MiB']:.0f} MiB) | "
            f"{ms(m['first_A'])} / "
            f"{ms(m['first_AT'])} | {ms(m['A'])} | {ms(m['AT'])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
