"""Timing, progress, table, JSON and plot for `python -m dynkernels bench`."""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..info import info
from .base import quiet_profiler
from .cases import Case, cases_for


def measure(fns: list, device: str, min_time: float = 1.0, min_runs: int = 3, max_runs: int = 30) -> list[list[float]]:
    """Seconds per call of each of fns, measured side by side: one warm-up
    each, then rounds that call every fn once, in turn, so that a slow spell
    of the machine hits them all alike. Rounds go on until min_time has
    passed (at least min_runs, at most max_runs). CUDA timings synchronise
    inside."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns:
        fn()
        sync()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_runs and (len(times[0]) < min_runs or time.perf_counter() - start < min_time):
        for fn, out in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    return times


def machine_rates(device: str) -> dict:
    """The floors' denominators, measured once per run: copy bandwidth (bytes
    read plus written by a 256 MB tensor copy, per second) and float32 GEMM
    rate (2 n^3 FLOPs of an n = 2048 matrix product, per second); the best of
    a few tries each."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    src = torch.empty(64 << 20, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)

    def best(fn, tries: int = 5) -> float:
        fn()
        sync()
        times = []
        for _ in range(tries):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    copy_s = best(lambda: dst.copy_(src))
    gemm_s = best(lambda: torch.mm(a, b))
    return {"copy_bytes_per_s": 2 * src.numel() * 4 / copy_s, "gemm_flops_per_s": 2 * 2048**3 / gemm_s}


def floor_seconds(case: Case, rates: dict) -> float | None:
    """The case's floor: its least bytes over the copy bandwidth or its least
    FLOPs over the GEMM rate, whichever is longer; None without a model."""
    if not case.floor_bytes and not case.floor_flops:
        return None
    return max(case.floor_bytes / rates["copy_bytes_per_s"], case.floor_flops / rates["gemm_flops_per_s"])


def release_memory() -> None:
    """Hands a finished case's memory back to the OS (glibc keeps freed
    blocks otherwise, and the run's resident size would grow case by case)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def peak_bytes(fn, device: str) -> int:
    """The peak of tensor memory allocated during one call, above what was
    allocated before it. CUDA: the caching allocator's peak counter; CPU: the
    profiler's allocation events, summed in time order."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    activities = [torch.profiler.ProfilerActivity.CPU]
    with quiet_profiler(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


class Progress:
    def __init__(self, total: int, stream=sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream

    def show(self, label: str) -> None:
        width = 28
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:70]:<70}")
        self.stream.flush()

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label)

    def close(self) -> None:
        self.stream.write("\n")


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=root).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "") if out.returncode == 0 else None
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str) -> dict:
    data = info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": data["torch"],
        "cuda": data["torch_cuda"],
        "triton": data["triton"]["version"],
        "python": platform.python_version(),
        "extension_built": data["extension"]["built"],
    }


def run_cases(cases: list[Case], device: str, rates: dict | None = None) -> list[dict]:
    progress = Progress(sum(1 for _ in cases))
    rows = []
    for case in cases:
        floor = floor_seconds(case, rates) if rates else None
        progress.show(f"{case.op} {case.size}: checking")
        impls = case.setup()
        assert tuple(i.name for i in impls) == case.impl_names, (case.op, [i.name for i in impls], case.impl_names)
        progress.show(f"{case.op} {case.size}: timing {', '.join(i.name for i in impls)} side by side")
        all_times = measure([impl.fn for impl in impls], device)
        for impl, times in zip(impls, all_times, strict=True):
            rows.append(
                {
                    "family": case.family,
                    "op": case.op,
                    "size": case.size,
                    "params": case.params,
                    "impl": impl.name,
                    "kind": impl.kind,
                    "agrees": impl.agrees,
                    "note": impl.note,
                    "median_s": statistics.median(times),
                    "min_s": min(times),
                    "max_s": max(times),
                    "runs": len(times),
                    "peak_mb": peak_bytes(impl.fn, device) / 2**20 if impl.measure_memory else None,
                    "stages_s": impl.stages,
                    "floor_s": floor,
                    "of_floor": floor / statistics.median(times) if floor else None,
                }
            )
        del impls
        release_memory()
        progress.step(f"{case.op} {case.size}: done")
    progress.close()
    kernel_time = {(r["op"], r["size"]): r["median_s"] for r in rows if r["kind"] == "kernel"}
    for r in rows:
        r["dynkernels_speedup"] = r["median_s"] / kernel_time[(r["op"], r["size"])]
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'op':<26} {'size':<34} {'implementation':<24} {'median ms':>10} {'min-max ms':>17} {'dk speedup':>10} "
        f"{'peak MB':>8} {'of floor':>8}  agrees"
    )
    lines = [header, "-" * len(header)]
    last = None
    for r in rows:
        key = (r["op"], r["size"])
        op, size = (r["op"], r["size"]) if key != last else ("", "")
        last = key
        spread = f"{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}"
        agrees = {None: "", True: "yes", False: "NO"}[r["agrees"]]
        speed = "" if r["kind"] == "kernel" else f"{r['dynkernels_speedup']:.1f}x"
        peak = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        of_floor = "" if r.get("of_floor") is None else f"{100 * r['of_floor']:.0f}%"
        lines.append(
            f"{op:<26} {size:<34} {r['impl']:<24} {r['median_s'] * 1e3:>10.2f} {spread:>17} {speed:>10} "
            f"{peak:>8} {of_floor:>8}  {agrees}"
        )
        if r.get("stages_s"):
            lines.append(" " * 28 + "stages (ms): " + stage_text(r["stages_s"]))
    lines.append("dk speedup = that implementation's median time / dynkernels' median time (higher: dynkernels faster)")
    lines.append("peak MB = tensor memory allocated during one call at its peak; stages from one profiled call")
    lines.append(
        "of floor = the case's least bytes / measured copy bandwidth, or least FLOPs / measured GEMM rate, "
        "whichever is longer, over that implementation's time (100%: at the machine's floor)"
    )
    return "\n".join(lines)


def stage_text(stages: dict) -> str:
    return ", ".join(f"{name} {seconds * 1e3:.0f}" for name, seconds in stages.items())


def format_markdown(rows: list[dict]) -> str:
    lines = [
        "| op | size | implementation | median ms | dynkernels speedup | peak MB | of floor | same result |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speed = "—" if r["kind"] == "kernel" else f"{r['dynkernels_speedup']:.1f}x"
        agrees = {None: "", True: "yes", False: "no"}[r["agrees"]]
        name = f"**{r['impl']}**" if r["kind"] == "kernel" else r["impl"]
        peak = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        of_floor = "" if r.get("of_floor") is None else f"{100 * r['of_floor']:.0f}%"
        lines.append(
            f"| {r['op']} | {r['size']} | {name} | {r['median_s'] * 1e3:.2f} | {speed} | {peak} | {of_floor} | {agrees} |"
        )
    staged = [r for r in rows if r.get("stages_s")]
    if staged:
        lines += ["", "Per-stage forward time (ms, one profiled call):", ""]
        names = list(dict.fromkeys(k for r in staged for k in r["stages_s"]))
        lines.append("| size | implementation | " + " | ".join(names) + " |")
        lines.append("|---|---|" + "---:|" * len(names))
        for r in staged:
            cells = " | ".join(f"{r['stages_s'].get(k, 0.0) * 1e3:.0f}" for k in names)
            lines.append(f"| {r['size']} | {r['impl']} | {cells} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["size"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 1.2 + 0.45 * len(rows)), squeeze=False)
    colors = {"kernel": "#2a7ab0", "variant": "#7fb3d5", "reference": "#999999", "anchor": "#e0892b"}
    for ax, ((op, size), rs) in zip(axes[:, 0], groups.items(), strict=True):
        names = [r["impl"] for r in rs]
        ms = [r["median_s"] * 1e3 for r in rs]
        ax.barh(names, ms, color=[colors[r["kind"]] for r in rs])
        ax.set_xscale("log")
        ax.set_xlim(left=min(ms) / 2, right=max(ms) * 4)
        ax.invert_yaxis()
        ax.set_title(f"{op}  {size}", fontsize=9, loc="left")
        for y, (v, r) in enumerate(zip(ms, rs, strict=True)):
            label = f"{v:.2f} ms" + ("" if r["kind"] == "kernel" else f"  ({r['dynkernels_speedup']:.1f}x)")
            ax.text(v, y, " " + label, va="center", fontsize=7)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("median time per call, ms (log scale)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    ops = [o.strip() for o in args.ops.split(",")] if args.ops else None
    size = "quick" if args.quick else "full" if getattr(args, "full", False) else "default"
    cases = cases_for(None, ops, size, device)
    if not cases:
        print(f"no benchmark case matches --ops {args.ops}", file=sys.stderr)
        return 2
    env = environment(device)
    print(
        f"dynkernels bench on {env['device_name']} ({device}, {env['threads']} threads), torch {env['torch']}, "
        f"commit {env['commit']}, {size} sizes",
        file=sys.stderr,
    )
    started = time.perf_counter()
    rates = machine_rates(device)
    env["size"] = size
    env.update(rates)
    print(
        f"machine floors: copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"float32 GEMM {rates['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s",
        file=sys.stderr,
    )
    rows = run_cases(cases, device, rates)
    env["duration_s"] = time.perf_counter() - started
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{device}" + ("" if size == "default" else f"-{size}")
    (out_dir / f"{stem}.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    table = format_table(rows)
    (out_dir / f"{stem}.txt").write_text(table + "\n")
    (out_dir / f"{stem}.md").write_text(format_markdown(rows) + "\n")
    plotted = plot(rows, out_dir / f"{stem}.png", f"dynkernels on {env['device_name']} ({device})")
    print(table)
    print(f"{len(cases)} cases in {env['duration_s']:.0f} s")
    print(
        f"wrote {out_dir / (stem + '.json')}, {stem}.txt"
        + (f", {stem}.png" if plotted else " (no matplotlib: no plot)")
    )
    bad = [r for r in rows if r["agrees"] is False]
    for r in bad:
        print(f"note: {r['impl']} disagrees with dynkernels on {r['op']} {r['size']} ({r['note']})", file=sys.stderr)
    return 0
