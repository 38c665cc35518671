"""Run one `qwenquant` command in a child process and measure it: peak RSS (whole run and per phase), wall time.

    from memtrace import trace_cli
    t = trace_cli(["fp8", "--model", DIR, "--out", OUT, "--json"], timeout_s=1800)
    t.peak_rss_bytes, t.phase_peaks, t.wall_s, t.returncode, t.stdout

The parent samples the child's resident set size from /proc every `interval` seconds and takes the exact peak from
`os.wait4` (the child's own ru_maxrss). Phases: the child (this file run as a script) wraps qwenquant.runner.run's stage
timer so that each timed phase (load, eval_source, quantize, eval_quantized, export, verify) and the rest of the run
(`report`: report, KL statistics and hashes after verification) write a marker line; the parent attributes its
samples to the phase running at that time. If qwenquant.runner.run changes and the wrapping fails, the child runs the CLI
unwrapped and only whole-run numbers are reported (phase_peaks empty), never a wrong attribution.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Trace:
    """What one traced command did."""

    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # ru_maxrss of the child (exact)
    sampled_peak_rss_bytes: int  # max of the /proc samples (may miss a short spike)
    phase_peaks: dict[str, int] = field(default_factory=dict)  # phase -> max sampled RSS during it
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # anonymous memory (RSS minus file-backed and shared pages, e.g. memory-mapped safetensors): what the kernel
    # cannot simply drop under pressure
    sampled_peak_anon_bytes: int = 0
    phase_anon_peaks: dict[str, int] = field(default_factory=dict)
    stdout: str = ""
    stderr_tail: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("stdout")
        return d


def _rss(pid: int, page: int) -> tuple[int, int] | None:
    """(resident bytes, anonymous resident bytes = resident - shared/file-backed) of a process."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
        return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page
    except (OSError, ValueError, IndexError):
        return None


def trace_cli(args: list[str], timeout_s: float = 3600, interval: float = 0.02, env: dict | None = None,
              threads: int | None = None) -> Trace:
    """Run `python benchmarks/memtrace.py --child <args>` (= `qwenquant <args>` with phase markers) and measure it."""
    marker = Path(f"/tmp/qq-memtrace-{os.getpid()}-{time.monotonic_ns()}.log")
    child_env = dict(os.environ, **(env or {}), QWENQUANT_MEMTRACE=str(marker), PYTHONPATH=str(REPO))
    if threads:
        child_env["QWENQUANT_MEMTRACE_THREADS"] = str(threads)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", *map(str, args)]
    out_f = open(marker.with_suffix(".out"), "w+")
    err_f = open(marker.with_suffix(".err"), "w+")
    start = time.time()
    proc = subprocess.Popen(argv, stdout=out_f, stderr=err_f, cwd=REPO, env=child_env)
    page = os.sysconf("SC_PAGE_SIZE")
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            r = _rss(proc.pid, page)
            if r is not None:
                samples.append((time.time(), *r))
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    timed_out = False
    rusage = None
    deadline = start + timeout_s
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            rusage, proc.returncode = ru, os.waitstatus_to_exitcode(status)
            break
        if time.time() > deadline:
            proc.kill()
            _, status, rusage = os.wait4(proc.pid, 0)
            proc.returncode, timed_out = 124, True
            break
        time.sleep(0.05)
    wall = time.time() - start
    stop.set()
    sampler.join()
    out_f.seek(0)
    err_f.seek(0)
    stdout, stderr = out_f.read(), err_f.read()
    out_f.close()
    err_f.close()
    phases = _read_markers(marker)
    for p in (marker, marker.with_suffix(".out"), marker.with_suffix(".err")):
        p.unlink(missing_ok=True)
    phase_peaks: dict[str, int] = {}
    phase_anon: dict[str, int] = {}
    phase_seconds: dict[str, float] = {}
    for name, t0, t1 in phases:
        inside = [(r, a) for t, r, a in samples if t0 <= t <= t1]
        if inside:
            phase_peaks[name] = max(phase_peaks.get(name, 0), max(r for r, _ in inside))
            phase_anon[name] = max(phase_anon.get(name, 0), max(a for _, a in inside))
        phase_seconds[name] = phase_seconds.get(name, 0.0) + (t1 - t0)
    return Trace(
        argv=[str(a) for a in args], returncode=proc.returncode, wall_s=wall,
        peak_rss_bytes=(rusage.ru_maxrss * 1024) if rusage else 0,
        sampled_peak_rss_bytes=max((r for _, r, _ in samples), default=0),
        phase_peaks=phase_peaks, phase_seconds=phase_seconds, stdout=stdout,
        sampled_peak_anon_bytes=max((a for _, _, a in samples), default=0), phase_anon_peaks=phase_anon,
        stderr_tail=("timed out; " if timed_out else "") + stderr[-3000:],
    )


def _read_markers(path: Path) -> list[tuple[str, float, float]]:
    """[(phase, start, end)] from the child's marker file ('start NAME T' / 'end NAME T' lines)."""
    if not path.is_file():
        return []
    open_at: dict[str, float] = {}
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        kind, name, t = parts[0], parts[1], float(parts[2])
        if kind == "start":
            open_at[name] = t
        elif kind == "end" and name in open_at:
            out.append((name, open_at.pop(name), t))
    end = time.time()
    out += [(name, t0, end) for name, t0 in open_at.items()]  # a phase the child died in
    return out


def _child(args: list[str]) -> int:
    """Run the CLI with phase markers around qwenquant.runner.run's timed phases (best effort)."""
    path = os.environ.get("QWENQUANT_MEMTRACE")
    if os.environ.get("QWENQUANT_MEMTRACE_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["QWENQUANT_MEMTRACE_THREADS"]))
    log = open(path, "a", buffering=1) if path else None

    in_report = [False]

    def mark(kind: str, name: str) -> None:
        if name == "report":
            if in_report[0] == (kind == "start"):
                return
            in_report[0] = kind == "start"
        elif kind == "start" and in_report[0]:
            mark("end", "report")
        if log:
            log.write(f"{kind} {name} {time.time():.4f}\n")

    try:
        from contextlib import contextmanager

        from qwenquant.runner import run

        timed = run.Run.timed

        @contextmanager
        def traced(self, name):
            mark("start", name)
            with timed(self, name):
                yield
            mark("end", name)
            if name in ("export", "verify"):
                mark("start", "report")  # until the next phase or the end of the run

        run.Run.timed = traced
        original = run.write_report

        def write_report(*a, **k):
            mark("end", "report")
            return original(*a, **k)

        run.write_report = write_report
    except Exception as err:  # the run still happens, unwrapped
        print(f"memtrace: phase markers disabled ({type(err).__name__}: {err})", file=sys.stderr)
    from qwenquant.cli import main

    mark("start", "process")
    code = main(args)
    mark("end", "process")
    return code


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    t = trace_cli(sys.argv[1:])
    print(json.dumps(t.to_dict(), indent=1))
    sys.exit(t.returncode)
