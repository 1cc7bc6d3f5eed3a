"""What every benchmark reports about the machine it ran on."""
from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine(threads: int) -> dict:
    """CPU model, cores, memory, software versions and the load average (noise indicator)."""
    import torch

    mem = _proc_field("/proc/meminfo", "MemTotal")
    out = {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": cores(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "mem_total_bytes": int(mem.split()[0]) * 1024 if mem else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_1min_at_end": loadavg(),
    }
    deepspeed = sys.modules.get("deepspeed")  # only when the benchmark used it (importing it prints)
    if deepspeed is not None:
        out["deepspeed"] = deepspeed.__version__
    return out


def rss_bytes() -> int | None:
    """Current resident set size (Linux /proc), None where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def maxrss_bytes(who=resource.RUSAGE_SELF) -> int:
    """Peak resident set size of this process (or its children) since start or the last reset_peak."""
    r = resource.getrusage(who).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def reset_peak() -> bool:
    """Reset this process's peak-RSS counter (Linux: clear_refs 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
