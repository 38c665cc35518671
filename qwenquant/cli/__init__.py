"""`qwenquant` command line: thin wrappers that build a Recipe and call the library."""

from __future__ import annotations

import json
import os
import sys

import typer

from qwenquant.errors import QwenquantError

app = typer.Typer(
    name="qwenquant",
    help="Quantize Qwen3 checkpoints (FP8, INT4 GPTQ/AWQ) into folders that transformers, vLLM and SGLang load.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Quantize Qwen3 checkpoints into folders that transformers, vLLM and SGLang load."""


from qwenquant.cli import fp8 as _fp8  # noqa: E402,F401  (registers commands)
from qwenquant.cli import int4 as _int4  # noqa: E402,F401
from qwenquant.cli import nvfp4 as _nvfp4  # noqa: E402,F401
from qwenquant.cli import int8 as _int8  # noqa: E402,F401
from qwenquant.cli import run as _run  # noqa: E402,F401
from qwenquant.cli import push as _push  # noqa: E402,F401
from qwenquant.cli import compare as _compare  # noqa: E402,F401
from qwenquant.cli import eval as _eval  # noqa: E402,F401
from qwenquant.cli import sensitivity as _sensitivity  # noqa: E402,F401
from qwenquant.cli import bench as _bench  # noqa: E402,F401
from qwenquant.cli import export as _export  # noqa: E402,F401


MULTI_VALUE_OPTIONS = ("--recipes",)


def expand_multi_value(args: list[str]) -> list[str]:
    """`--recipes a.yaml b.yaml` -> `--recipes a.yaml --recipes b.yaml` (click options take one value each)."""
    out, current = [], None
    for arg in args:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            continue
        if current and not arg.startswith("-"):
            out += [current, arg]
            continue
        current = None
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors on stderr, documented exit codes (see README)."""
    args = expand_multi_value(list(sys.argv[1:] if argv is None else argv))
    want_json = "--json" in args
    _sigterm_as_interrupt()
    _one_line_warnings()
    try:
        app(args=args, standalone_mode=False, prog_name="qwenquant", obj={"argv": list(args)})
    except QwenquantError as err:
        if os.environ.get("RANK", "0") not in ("", "0"):  # a distributed run: rank 0 prints the same error once
            return err.exit_code
        return _fail(str(err), err.exit_code, want_json, getattr(err, "details", None))
    except typer.Abort:
        return _fail("aborted", 130, want_json)
    except typer.TyperException as err:  # bad flags or values (typer's click exceptions)
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        return _fail(message.replace("\n", " "), 2, want_json)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") not in ("", "0"):  # rank 0 says what became of the output folder
            return 130
        return _fail("interrupted; no output folder was left behind", 130, want_json)
    except SystemExit as err:  # typer.Exit from commands
        return int(err.code or 0)
    return 0


def _one_line_warnings() -> None:
    """Warnings (qwenquant's own, which say what was not done and why) as one line each on stderr, like errors,
    without Python's file, line and source line."""
    import warnings

    warnings.formatwarning = lambda message, category, *_args, **_kwargs: f"qwenquant: warning: {message}\n"


def _sigterm_as_interrupt() -> None:
    """CI cancellations send SIGTERM: treat it like Ctrl-C, so a run cleans up (or keeps its progress for --resume)."""
    import signal

    def handler(_signum, _frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        pass


def _fail(message: str, code: int, want_json: bool, details: dict | None = None) -> int:
    """One line on stderr; with --json also one JSON object on stdout (plus what the error carries, e.g. the
    --dry-run estimate)."""
    print(f"qwenquant: error: {message}", file=sys.stderr)
    if want_json:
        print(json.dumps((details or {}) | {"ok": False, "error": message, "exit_code": code}))
    return code


def run() -> None:
    sys.exit(main())
