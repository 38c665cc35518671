"""What this machine has now: host memory available to a new process, free device memory, free disk space where
the output goes, and this process's resident size (the baseline a run starts from)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def available_host_bytes() -> tuple[int | None, str]:
    """(bytes available for a new process, where the number comes from): MemAvailable, or a lower cgroup limit."""
    avail, source = None, "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail, source = int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and (avail is None or int(limit) - used < avail):
            avail, source = int(limit) - used, "cgroup memory.max - memory.current"
    except (OSError, ValueError):
        pass
    return avail, source


def available_device_bytes(device) -> int | None:
    """Free memory of a CUDA device now (None for CPU)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def free_disk_bytes(out: Path) -> tuple[int, Path]:
    """Free bytes on the filesystem that will hold --out (its first existing ancestor)."""
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free, parent


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
