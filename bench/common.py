"""What every benchmark reports about the machine it ran on, and how it hands over its result."""
from __future__ import annotations

import json
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


def mem_total_bytes() -> int | None:
    """Physical memory (Linux /proc/meminfo), None where unknown."""
    mem = _proc_field("/proc/meminfo", "MemTotal")
    return int(mem.split()[0]) * 1024 if mem else None


def machine(threads: int) -> dict:
    """CPU model, cores, memory, software versions and the load average (noise indicator)."""
    import torch

    out = {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": cores(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "mem_total_bytes": mem_total_bytes(),
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
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def maxrss_bytes(who=resource.RUSAGE_SELF) -> int:
    """Peak resident set size of this process (or its children) since the last reset_peak.

    For this process Linux's `VmHWM` is read: `reset_peak` resets it. `getrusage` is not reset: it also keeps
    the high-water mark every exited thread recorded (an import-time peak, say), so after a reset it can
    report more than the process held since. Elsewhere, and for children, `getrusage`."""
    if who == resource.RUSAGE_SELF:
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            return hwm * 1024
    r = resource.getrusage(who).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status, None where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


MMAP_THRESHOLD = 65536
"""`MALLOC_MMAP_THRESHOLD_` of a child whose peak RSS measures tensors (see `tracking_malloc_env`)."""


def tracking_malloc_env(default_malloc: bool = False) -> dict:
    """The environment for a child process whose peak RSS is meant to follow its live tensors.

    glibc serves every block above `MMAP_THRESHOLD` bytes from its own mapping and unmaps it on free, so
    RSS rises and falls with the tensors. With glibc's default the threshold grows (up to 32 MiB) as
    large blocks are freed; freed activations then stay in the heap and a pass that reuses them shows no
    RSS growth at all. `default_malloc` keeps glibc's default (any inherited `MALLOC_*` is dropped either way)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return env


def reset_peak() -> bool:
    """Reset this process's peak-RSS counter (Linux: clear_refs 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def emit(result: dict, out: str | None = None, md: str | None = None, markdown=None) -> None:
    """Hand over a benchmark's result: the JSON to `out` (when given), `markdown(result)` to `md` (when
    given), and the JSON on stdout, the only thing a benchmark prints there."""
    text = json.dumps(result, indent=1)
    from neox_zoology.io import atomic_write_text

    for path, content in ((out, text + "\n"), (md, markdown(result) if md else None)):
        if path:
            atomic_write_text(path, content)
    print(text, flush=True)
