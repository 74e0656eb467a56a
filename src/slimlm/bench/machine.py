"""Machine facts recorded with every result, and a check for a busy CPU."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """Short commit of the checkout, with "+dirty" when the working tree has changes."""
    try:
        root = Path(__file__).resolve().parents[3]
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                        timeout=5).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD") or None
        if commit and run("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return None


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""CPU features that decide which kernel paths run (native kernels, bf16 matmuls)."""


def cpu_features() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in SIMD_FLAGS if f in flags]
    except OSError:
        pass
    return []


def machine_info(threads: int) -> dict:
    import torch

    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
        "python": platform.python_version(), "commit": git_commit(), "cpu_features": cpu_features(),
        "native_kernels": os.environ.get("SLIMLM_NATIVE", "1") != "0",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of the machine's CPU used by *other* processes over a short window (0..1)."""
    def snap():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals), idle

    try:
        t0, i0 = snap()
        self0 = os.times()
        time.sleep(seconds)
        t1, i1 = snap()
        self1 = os.times()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    total = t1 - t0
    own = ((self1.user - self0.user) + (self1.system - self0.system)) * ticks
    return max(0.0, (total - (i1 - i0) - own) / total) if total else 0.0


def cpu_ticks() -> tuple[int, int] | None:
    """(all ticks, steal ticks) of the machine so far, from /proc/stat (None where unreadable).
    Steal is the time a virtual machine's CPUs were ready to run but the hypervisor ran something
    else: a neighbour's load, invisible to :func:`cpu_busy`, that slows every run it overlaps."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals[:8]), (vals[7] if len(vals) > 7 else 0)


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    """Share of the machine's CPU time stolen by the hypervisor between two :func:`cpu_ticks`."""
    if not before or not after or after[0] <= before[0]:
        return 0.0
    return max(0.0, (after[1] - before[1]) / (after[0] - before[0]))


_PROBE_BUF = []


def speed_probe(rounds: int = 3) -> dict[str, float]:
    """This machine's own speed right now, on one thread: a float32 matmul's GFLOPS and a 64 MB
    read's GB/s, the best of ``rounds`` (~0.1 s in all). Run before each benchmark run, it shows a
    machine whose speed drifts between runs (a shared host: frequency, memory bandwidth taken by
    other guests), which neither :func:`cpu_busy` nor steal time sees. A hint, not a proof: in
    session 13's interleaved throughput run slimlm's two repeats differed 1.34x (200.0 and 148.8
    tok/s) and the probe did not follow (its first reading was low, 50 GFLOPS against 94-120: the
    library's first call, untimed since)."""
    import torch

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if not _PROBE_BUF:
            g = torch.Generator().manual_seed(0)
            _PROBE_BUF.extend([torch.randn(384, 384, generator=g), torch.ones(16 * 2**20)])
        a, buf = _PROBE_BUF
        a @ a, buf.sum()  # untimed: the first call of a process initializes the matmul library
        best_mm = best_rd = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(8):
                a @ a
            best_mm = min(best_mm, time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(2):
                buf.sum()
            best_rd = min(best_rd, time.perf_counter() - t)
    finally:
        torch.set_num_threads(n_threads)
    return {"probe_gflops": 8 * 2 * 384**3 / best_mm / 1e9, "probe_gbs": 2 * buf.numel() * 4 / best_rd / 1e9}


def peak_rss_mb() -> float:
    """This process's own peak resident memory: VmHWM of its address space. (``ru_maxrss``
    survives ``exec``, so a worker forked from a parent that loaded a model reported the
    parent's peak as its own.)"""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def huge_pages_mb(smaps: str = "/proc/self/smaps_rollup") -> float | None:
    """Anonymous memory of this process backed by transparent huge pages now (MB; None off
    Linux). A decode step streams every weight: whether they sit on 2 MiB pages
    (``model/quant/huge_pages.py``) moves batch-1 decode speed, so reports record it."""
    try:
        for line in Path(smaps).read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def rss_mb() -> float:
    """Resident memory of this process now (MB)."""
    return _status_mb("VmRSS") or peak_rss_mb()


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM). False if
    unsupported, in which case :func:`window_peak_rss_mb` is the peak since the process began."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (MB)."""
    return _status_mb("VmHWM") or peak_rss_mb()
