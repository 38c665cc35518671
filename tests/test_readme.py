"""The README's commands against the CLI they document (issue 18), so the README cannot drift from the CLI:

* every `qwenquant` line of every bash block parses: each flag exists and its value is accepted, for every
  `a|b` alternative and every `[optional]` part (click parses without running anything);
* every line runs to its documented exit code, in the order written, from a fresh working folder holding the
  repo's `recipes/`: on the tiny random Qwen3 (`DIR`) with fast settings appended (fewer calibration samples,
  one short perplexity window, a tiny bench grid), which override the README's values and change nothing else.
  The first block's command runs verbatim on the trained fixture, as a newcomer types it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from qwenquant.cli import app, expand_multi_value
from qwenquant.export.gguf_meta import llama_cpp_module
from qwenquant.export.onnx_build import missing_packages
from tests.conftest import REPO_ROOT, SHARED, run_cli

README = REPO_ROOT / "README.md"
FENCE = re.compile(r"```bash\n(.*?)```", re.S)


def readme_commands() -> list[str]:
    """Every `qwenquant ...` command of the README's bash blocks, comments stripped, in order."""
    commands = []
    for block in FENCE.findall(README.read_text(encoding="utf-8")):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("qwenquant "):
                    commands.append(part)
    return commands


def variants(command: str) -> list[list[str]]:
    """`[...]` parts included; `a|b` values and `--x/--y` switches give one variant per alternative (variant i takes
    alternative i of each token, the last one when it has fewer), so every alternative is parsed at least once."""
    tokens = shlex.split(command.replace("[", " ").replace("]", " "))[1:]
    choices = [t.split("/") if re.fullmatch(r"--[\w-]+/--[\w-]+", t) else t.split("|") for t in tokens]
    count = max(len(c) for c in choices)
    return [[c[min(i, len(c) - 1)] for c in choices] for i in range(count)]


PLACEHOLDERS = {"DIR": "model", "OUT": "out/o", "OUT_DIR": "out/o", "OUT_A": "out/a", "OUT_B": "out/b", "N": "2",
                "SRC_DIR": "model"}


def placed(args: list[str], values: dict[str, str]) -> list[str]:
    return [values.get(a, a) for a in args]


def click_command():
    return typer.main.get_command(app)


def parse_only(args: list[str]) -> None:
    """Parse like `qwenquant ARGS` does, without invoking: unknown flags and refused values raise click errors."""
    group = click_command()
    ctx = click.Context(group, info_name="qwenquant")
    sub = group.get_command(ctx, args[0])
    assert sub is not None, f"no command {args[0]!r}"
    sub.make_context(args[0], expand_multi_value(list(args[1:])), parent=ctx).close()


def test_readme_has_the_commands_it_should():
    commands = readme_commands()
    names = {c.split()[1] for c in commands}
    assert {"fp8", "gptq", "awq", "rtn", "run", "sensitivity", "bench", "eval", "compare", "report", "push"} <= names
    first = commands[0]
    assert first.startswith("qwenquant fp8 --model ../shared/models/qwen3-mini")


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    for args in variants(command):
        args = placed(args, PLACEHOLDERS)
        try:
            parse_only(args)
        except Exception as err:  # click's UsageError / BadParameter: the README no longer matches the CLI
            pytest.fail(f"README command {' '.join(args)!r} does not parse: {err}")


# -- running them ----------------------------------------------------------------------------------------------------

def fast_flags(tiny_args_by_flag: dict[str, str], command: str) -> list[str]:
    """The fast settings each command accepts (from the click options it declares)."""
    group = click_command()
    sub = group.get_command(click.Context(group, info_name="qwenquant"), command)
    declared = {opt for p in sub.params for opt in getattr(p, "opts", [])}
    extra = {"bench": {"--batch-sizes": "1", "--context": "32", "--decode-tokens": "2", "--no-compile": None},
             "eval": {"--limit": "2"}, "sensitivity": {"--top": "3"}}.get(command, {})
    out = []
    for flag, value in (tiny_args_by_flag | extra).items():
        if flag in declared:
            out += [flag] if value is None else [flag, value]
    return out


# Exit codes other than 0, each with the README's reason.
EXPECTED_EXIT = {
    "qwenquant fp8  --model Qwen3-4B": {2},  # a hub id: offline here, one line naming `hf download`
    # a random model may miss a 1% gate even with 8 groups kept: then the best candidate is written and it exits 3
    "qwenquant rtn  --model DIR --keep-sensitive auto": {0, 3},
}


def expected_exit(command: str) -> set[int]:
    for prefix, codes in EXPECTED_EXIT.items():
        if command.startswith(prefix):
            return codes
    return {0}


@pytest.mark.slow
def test_readme_commands_run_in_order(tiny_qwen3, tiny_args, tmp_path, monkeypatch, mini_model):
    """Each README command in order, from one working folder, as a newcomer types them."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(REPO_ROOT / "recipes")
    (work / "model").symlink_to(tiny_qwen3)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fast = dict(zip(tiny_args[::2], tiny_args[1::2]))
    fast.pop("--model")
    fast["--quiet"] = None

    commands = readme_commands()
    first, rest = commands[0], commands[1:]
    res = run_cli(shlex.split(first.replace("../shared", str(SHARED)))[1:])
    assert res.code == 0, f"{first}: exit {res.code}: {res.err[-2000:]}"
    out = Path(shlex.split(first)[-1])
    assert (out / "model.safetensors").is_file() and (out / "qwenquant_report.json").is_file()

    for command in rest:
        args = placed(variants(command)[0], PLACEHOLDERS | {"OUT_DIR": str(out), "OUT_A": str(out),
                                                            "SRC_DIR": str(mini_model)})
        if args[0] in ("report",):  # OUT_B: the first folder written by a quantize command below DIR
            args = [a if a != "out/b" else str(_latest_output(work, out)) for a in args]
        if args[:2] == ["export", "onnx"] and missing_packages():
            continue  # parsed above; running it needs the [onnx] extra (tests/cli/test_cli_onnx.py skips likewise)
        if args[:2] == ["export", "gguf"] and "q4_k_m" in args and llama_cpp_module() is None:
            continue  # parsed above; a K-quant needs llama.cpp's quantizer, the [gguf] extra
        args = args + fast_flags(fast, args[0])
        before = _finished_outputs(work)
        res = run_cli(args)
        want = expected_exit(command)
        assert res.code in want, f"README command {command!r} -> {' '.join(args)}: exit {res.code} (want {want}): " \
                                 f"{' | '.join(res.error_lines) or res.err[-2000:]}"
        if res.code == 2:
            assert len(res.error_lines) == 1 and "hf download" in res.error_lines[0], res.err
        elif args[0] in QUANTIZE:  # each quantize command writes its own folder: none is refused as existing
            assert len(_finished_outputs(work) - before) == 1, f"{command!r} wrote no new output folder"
    for written in ("cmp/COMPARE.md", "sens/SENSITIVITY.md", f"{out}/bench/BENCH.md"):
        assert (work / written).is_file(), written


QUANTIZE = ("fp8", "gptq", "awq", "rtn", "run")


def _finished_outputs(work: Path) -> set[Path]:
    return {p.parent for p in work.rglob("qwenquant_report.json")}


def _latest_output(work: Path, exclude: Path) -> Path:
    """Another finished output folder (has a report) written in the working folder."""
    found = sorted(p.parent for p in work.rglob("qwenquant_report.json") if p.parent.resolve() != exclude.resolve())
    assert found, "no second finished output folder to merge"
    return found[0]
