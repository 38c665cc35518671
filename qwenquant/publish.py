"""Publishing a finished output folder: checks, the file list, and the upload (huggingface_hub)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from qwenquant.errors import BadInputError

REQUIRED_FILES = ("config.json", "qwenquant_report.json", "README.md", "recipe.yaml")
CARD_KEYS = ("base_model", "library_name", "tags")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_publishable(folder: Path) -> dict:
    """Refuse folders that are not finished, verified qwenquant outputs; return their report."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"{folder}: no such folder; pass a qwenquant output folder")
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise BadInputError(f"{folder}: missing {', '.join(missing)}; only complete qwenquant output folders can be pushed")
    if not list(folder.glob("*.safetensors")):
        raise BadInputError(f"{folder}: no *.safetensors weights; only complete qwenquant output folders can be pushed")
    report = json.loads((folder / "qwenquant_report.json").read_text())
    v = report.get("verification")
    if v is None:
        raise BadInputError(f"{folder}: was written with --no-verify; re-run with verification before publishing")
    if not v.get("passed"):
        raise BadInputError(f"{folder}: failed verification ({v.get('reason')}); fix the run before publishing")
    failed = [g for g in report.get("gates", []) if not g.get("passed")]
    if failed:
        raise BadInputError(f"{folder}: failed quality gate {failed[0]['gate']}; fix the run before publishing")
    check_card(folder / "README.md")
    return report


def check_card(card: Path) -> dict:
    """The model card's YAML front matter parses and has the keys the hub uses."""
    match = re.match(r"^---\n(.*?)\n---\n", card.read_text(encoding="utf-8"), re.S)
    if not match:
        raise BadInputError(f"{card}: model card has no YAML front matter")
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise BadInputError(f"{card}: model card front matter is not valid YAML ({err})") from err
    missing = [k for k in CARD_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise BadInputError(f"{card}: model card front matter lacks {', '.join(missing)}")
    return meta


def files_to_upload(folder: Path) -> list[dict]:
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size}
            for p in sorted(Path(folder).rglob("*")) if p.is_file()]


def push(folder: Path, repo_id: str, private: bool = False, dry_run: bool = False, local_dir: Path | None = None) -> dict:
    """Validate, then upload to the hub (or copy to `local_dir`); `dry_run` only lists what would go."""
    if not REPO_ID.match(repo_id):
        raise BadInputError(f"--repo-id {repo_id!r}: expected 'org/name'")
    check_publishable(folder)
    files = files_to_upload(folder)
    result = {"repo_id": repo_id, "private": private, "files": files, "total_bytes": sum(f["bytes"] for f in files),
              "dry_run": dry_run, "target": str(local_dir) if local_dir else "huggingface hub"}
    if dry_run:
        return result
    if local_dir is not None:
        dest = Path(local_dir) / repo_id
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(folder, dest)
        result["url"] = str(dest)
        return result
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload quantized checkpoint made with qwenquant")
    except Exception as err:  # auth, network, permissions: all are the user's to fix
        raise BadInputError(f"upload to {repo_id} failed ({type(err).__name__}: {err}); check `hf auth login` / HF_TOKEN and network") from err
    result["url"] = getattr(commit, "commit_url", str(commit))
    return result
