"""Data-free FP8 at real sizes: qwenquant's streaming path vs the floor vs llm-compressor's `model_free_ptq`,
side by side on shape-true random Qwen3 checkpoints (0.6B, 1.7B, 4B, 8B; built once with a seed by
benchmarks/random_models.py `build_random_qwen3_sharded`, 4 GiB shards like the hub's).

Per size and scheme, one after the other, each from a cold page cache (`echo 3 > /proc/sys/vm/drop_caches`, so every
tool reads the source from disk) and timed until its output is on disk (`sync` inside the timing):
- `io`: the pure I/O bound: read every source byte, write as many bytes as qwenquant's output has, fsync;
- `floor`: benchmarks/stream_floor.py, the few lines that read each tensor, apply the same FP8 arithmetic and
  write each shard (no checks, no config, whole shards in memory);
- `qwenquant`: `qwenquant fp8 --model SRC ...` with `--no-verify --no-ppl --kl-tokens 0` (no evaluation pass;
  verification and evaluation are measured separately by the `verify` rows, `--sizes` permitting);
- `model_free_ptq`: llm-compressor's own data-free entry point (its venv: benchmarks/setup_llmcompressor.sh), scheme
  FP8_DYNAMIC / FP8_BLOCK, lm_head ignored, `max_workers` = cores.
Memory: peak anonymous (heap) memory of the process tree (RssAnon summed, sampled every 20 ms) and peak RSS.

    python benchmarks/real_sizes.py [--sizes 0.6b,1.7b,4b,8b] [--schemes channel,block] [--repeats 1]
Writes benchmarks/results/real_sizes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from random_models import build_random_qwen3_sharded, weight_bytes  # noqa: E402

RESULTS = HERE / "results"
LLMC_PY = HERE / ".venv-llmcompressor" / "bin" / "python"
MFP = """
import sys
from llmcompressor import model_free_ptq
model_free_ptq(sys.argv[1], sys.argv[2], scheme=sys.argv[3], ignore=["lm_head"], max_workers=int(sys.argv[4]))
"""
IO = """
import os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
buf = bytearray(64 << 20)
for f in sorted(p for p in os.listdir(src) if p.endswith(".safetensors")):
    with open(os.path.join(src, f), "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
os.makedirs(dst, exist_ok=True)
with open(os.path.join(dst, "out.bin"), "wb", buffering=0) as fh:
    while n > 0:
        n -= fh.write(memoryview(buf)[: min(n, len(buf))])
    os.fsync(fh.fileno())
"""


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise SystemExit(f"cannot drop the page cache ({err}); run as root") from err


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RssAnon summed over the process tree, RSS summed) in bytes."""
    anon = rss = 0
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon, rss


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time (cold cache, until synced) and peak memory of one command."""
    drop_caches()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            a, r = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], a), max(peak[1], r)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    run_s = time.perf_counter() - t
    os.sync()
    wall = time.perf_counter() - t
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "until_exit_s": run_s, "peak_anon_bytes": peak[0], "peak_rss_bytes": peak[1]}


def commands(tool: str, src: Path, dst: Path, scheme: str, out_bytes: int) -> tuple[list[str], dict | None]:
    cores = str(len(os.sched_getaffinity(0)))
    if tool == "io":
        return [sys.executable, "-c", IO, str(src), str(dst), str(out_bytes)], None
    if tool == "floor":
        return [sys.executable, str(HERE / "stream_floor.py"), str(src), str(dst), scheme], None
    if tool == "qwenquant":
        flags = ["--weights", "block"] if scheme == "block" else []
        return [shutil.which("qwenquant"), "fp8", "--model", str(src), "--out", str(dst), *flags, "--no-verify",
                "--no-ppl", "--kl-tokens", "0", "--quiet"], None
    if tool == "model_free_ptq":
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        return [str(LLMC_PY), "-c", MFP, str(src), str(dst), {"channel": "FP8_DYNAMIC", "block": "FP8_BLOCK"}[scheme],
                cores], env
    raise ValueError(tool)


def run_size(size: str, schemes: list[str], repeats: int, root: Path, tools: list[str]) -> list[dict]:
    src = build_random_qwen3_sharded(size, root)
    rows = []
    for scheme in schemes:
        out_bytes = None
        for r in range(repeats):
            for tool in tools:
                dst = root / "out" / f"{size}-{scheme}-{tool}"
                shutil.rmtree(dst, ignore_errors=True)
                cmd, env = commands(tool, src, dst, scheme, out_bytes or weight_bytes(src) // 2)
                m = measure(cmd, env)
                written = weight_bytes(dst) if tool != "io" else out_bytes
                if tool == "qwenquant":
                    out_bytes = written
                    report = json.loads((dst / "qwenquant_report.json").read_text())
                    m["phases_s"] = report["timings_s"]
                rows.append({"size": size, "scheme": scheme, "tool": tool, "repeat": r,
                             "source_bytes": weight_bytes(src), "output_bytes": written} | m)
                print(f"{size:>5} {scheme:<7} {tool:<15} {m['wall_s']:7.1f} s  anon {m['peak_anon_bytes'] / 2**30:5.2f} GiB"
                      f"  rss {m['peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)
                shutil.rmtree(dst, ignore_errors=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    keys = sorted({(r["size"], r["scheme"]) for r in rows}, key=lambda k: (float(k[0][:-1]), k[1]))
    for size, scheme in keys:
        by_tool = {}
        for r in rows:
            if (r["size"], r["scheme"]) == (size, scheme):
                by_tool.setdefault(r["tool"], []).append(r)
        line = {"size": size, "scheme": scheme, "source_gib": next(iter(by_tool.values()))[0]["source_bytes"] / 2**30}
        for tool, rs in by_tool.items():
            walls = [r["wall_s"] for r in rs]
            line[f"{tool}_s"] = statistics.median(walls)
            line[f"{tool}_spread_s"] = max(walls) - min(walls)
            line[f"{tool}_anon_gib"] = max(r["peak_anon_bytes"] for r in rs) / 2**30
        if "qwenquant_s" in line and "floor_s" in line:
            line["qwenquant_vs_floor"] = line["qwenquant_s"] / line["floor_s"]
        if "model_free_ptq_s" in line and "qwenquant_s" in line:
            line["qwenquant_vs_model_free_ptq"] = line["qwenquant_s"] / line["model_free_ptq_s"]
        table.append(line)
    return table


def markdown(table: list[dict], meta: dict) -> str:
    cols = ["size", "scheme", "source_gib", "io_s", "floor_s", "qwenquant_s", "model_free_ptq_s", "qwenquant_vs_floor",
            "qwenquant_vs_model_free_ptq", "floor_anon_gib", "qwenquant_anon_gib", "model_free_ptq_anon_gib"]
    lines = ["# Data-free FP8 at real sizes", "", meta["note"], "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for t in table:
        lines.append("| " + " | ".join(f"{t[c]:.2f}" if isinstance(t.get(c), float) else str(t.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.6b,1.7b,4b,8b")
    ap.add_argument("--schemes", default="channel,block")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--root", default="/tmp/qq-real")
    ap.add_argument("--tools", default="io,floor,qwenquant,model_free_ptq")
    ap.add_argument("--name", default="real_sizes")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine the rows of earlier runs' JSON files into "
                    "--name instead of measuring")
    a = ap.parse_args()
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        rows = [r for p in parts for r in p["rows"]]
        meta = parts[0]["meta"] | {"merged_from": [Path(p).name for p in a.merge],
                                   "repeats": sorted({p["meta"]["repeats"] for p in parts})}
        write(a.name, summarize(rows), rows, meta)
        return
    tools = a.tools.split(",")
    if "model_free_ptq" in tools and not LLMC_PY.exists():
        raise SystemExit(f"{LLMC_PY} missing: run benchmarks/setup_llmcompressor.sh first")
    rows = []
    for size in a.sizes.split(","):
        rows += run_size(size, a.schemes.split(","), a.repeats, Path(a.root), tools)
    table = summarize(rows)
    meta = {"note": (f"Shape-true random Qwen3 checkpoints (bf16, 4 GiB shards), this machine: {os.cpu_count()} cores, "
                     f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM. Each command from a cold page cache, timed "
                     f"until its output is synced to disk; medians of {a.repeats} repeat(s), spread = max - min. "
                     "anon = peak anonymous memory of the process tree (GiB)."),
            "repeats": a.repeats, "cores": os.cpu_count()}
    write(a.name, table, rows, meta)


def write(name: str, table: list[dict], rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "table": table, "rows": rows}, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(table, meta))
    print(markdown(table, meta))


if __name__ == "__main__":
    main()
