"""A hub model for `--dry-run` without its weights: the local cache when it has the model, else config.json and the
safetensors headers read from the hub (`huggingface_hub.get_safetensors_metadata` fetches only the headers, with
HTTP range requests), so a run can be sized before anything large is downloaded.

`sizing_source(repo_id, revision)` returns (folder, headers): a cached snapshot folder and None, or the folder
config.json was fetched into and the headers of every safetensors file as they are on the hub ({file: {tensor:
{"dtype", "shape", "data_offsets"}}}, the layout of a safetensors header). With HF_HUB_OFFLINE set, only the cache
counts: a cached config.json without weights is returned without headers (the estimate then derives every tensor from
the config), nothing cached is a one-line BadInputError.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwenquant.errors import BadInputError

CACHED_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py"]  # what a run downloads


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1 / true / yes)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local cache's snapshot folder of `repo_id` at `revision` (None when the cache has none)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=CACHED_PATTERNS,
                                                 local_files_only=True)
    except LocalEntryNotFoundError:
        return None
    return Path(path)


def sizing_source(repo_id: str, revision: str | None) -> tuple[Path, dict[str, dict[str, dict]] | None]:
    """(folder with config.json, hub safetensors headers or None when the folder has the weights or is all there
    is): see the module docstring."""
    cached = cached_snapshot(repo_id, revision)
    if cached is not None and any(cached.glob("*.safetensors")):
        return cached, None
    if offline():
        if cached is not None and (cached / "config.json").is_file():
            return cached, None
        raise BadInputError(f"--model {repo_id}: HF_HUB_OFFLINE is set and the model is not in the local cache; "
                            "unset HF_HUB_OFFLINE (--dry-run then reads only config.json and the safetensors headers "
                            "from the hub) or pass a local folder holding its config.json")
    return _fetch_config(repo_id, revision), _remote_headers(repo_id, revision)


def _fetch_config(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision)).parent
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise BadInputError(f"--model {repo_id}: the hub refused config.json ({type(err).__name__}); check the id and "
                            "--revision, and log in (hf auth login) for gated or private models") from err
    except Exception as err:  # network failures come in many classes; all mean the same thing to the user
        raise BadInputError(f"--model {repo_id}: cannot read config.json from the hub ({type(err).__name__}); check "
                            "the network, or pass a local folder holding its config.json") from err


def _remote_headers(repo_id: str, revision: str | None) -> dict[str, dict[str, dict]]:
    import huggingface_hub
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        meta = huggingface_hub.get_safetensors_metadata(repo_id, revision=revision)
    except NotASafetensorsRepoError as err:
        raise BadInputError(f"--model {repo_id}: the hub repo has no safetensors weights; convert .bin weights first "
                            "and pass the local folder") from err
    except Exception as err:
        raise BadInputError(f"--model {repo_id}: cannot read the safetensors headers from the hub "
                            f"({type(err).__name__}); check the network, or pass a local folder holding its "
                            "config.json") from err
    return {file: {name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
                   for name, t in fm.tensors.items()}
            for file, fm in meta.files_metadata.items()}
