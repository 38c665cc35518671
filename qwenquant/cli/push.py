"""`qwenquant push OUT_DIR --repo-id org/name`: publish a verified output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.cli.flags import Given, with_groups
from qwenquant.cli.options import PRINTING
from qwenquant.publish import push


@app.command("push")
@with_groups(PRINTING)
def push_command(
    folder: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="A qwenquant output folder.")],
    repo_id: Annotated[str, typer.Option(help="Target hub repository, org/name.")],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and list what would be uploaded; upload nothing.")] = False,
    local_dir: Annotated[Optional[Path], typer.Option(help="Copy to LOCAL_DIR/org/name instead of the hub (mirrors, tests).")] = None,
    *,
    given: Given,
) -> None:
    """Upload a verified output folder (token from HF_TOKEN or `hf auth login`); refuses unverified folders."""
    quiet, json_out = given["quiet"], given["json_out"]
    result = push(folder, repo_id, private=private, dry_run=dry_run, local_dir=local_dir)
    if json_out:
        print(json.dumps({"ok": True} | result))
    elif not quiet:
        verb = "would upload" if dry_run else "uploaded"
        for f in result["files"]:
            print(f"  {f['path']}  ({f['bytes']} bytes)")
        print(f"{verb} {len(result['files'])} files, {result['total_bytes']} bytes to {repo_id} ({result['target']})")
