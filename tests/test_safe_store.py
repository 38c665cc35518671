"""qwenquant.safe_store: nested run data round-trips exactly without pickle; changed files and unknown types are
refused."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from qwenquant import safe_store


@dataclass
class Point:
    x: float
    t: torch.Tensor | None = None


def test_round_trip_is_exact(tmp_path) -> None:
    data = {"a": [1, 2.5, None, True, "s"], 3: (torch.randn(2, 3).to(torch.bfloat16), {"k": torch.tensor(7)}),
            0.25: Point(0.1, torch.randn(4).to(torch.float8_e4m3fn)), "nan": float("nan")}
    safe_store.save(data, tmp_path / "x", (Point,))
    back = safe_store.load(tmp_path / "x", (Point,))
    assert list(back) == ["a", 3, 0.25, "nan"] and back["a"] == [1, 2.5, None, True, "s"]
    assert isinstance(back[3], tuple) and torch.equal(back[3][0], data[3][0]) and back[3][0].dtype == torch.bfloat16
    assert back[0.25].x == 0.1 and torch.equal(back[0.25].t.view(torch.uint8), data[0.25].t.view(torch.uint8))
    assert back["nan"] != back["nan"]  # NaN stays NaN


def test_unfinished_save_is_absent_and_changes_are_refused(tmp_path) -> None:
    assert safe_store.load(tmp_path / "none") is None
    safe_store.save({"w": torch.ones(3)}, tmp_path / "x")
    (tmp_path / "x.sha256").unlink()  # killed before the last write: not a save
    assert safe_store.load(tmp_path / "x") is None
    safe_store.save({"w": torch.ones(3)}, tmp_path / "x")
    doc = json.loads((tmp_path / "x.json").read_text())
    doc["data"] = {"c": "Popen", "f": {}}
    (tmp_path / "x.json").write_text(json.dumps(doc))
    with pytest.raises(safe_store.TamperedFile, match="x.json does not match its hash"):
        safe_store.load(tmp_path / "x")


def test_only_allowed_dataclasses_are_stored_or_rebuilt(tmp_path) -> None:
    with pytest.raises(TypeError, match="cannot store a Point"):
        safe_store.save(Point(1.0), tmp_path / "p")
    safe_store.save(Point(1.0), tmp_path / "p", (Point,))
    with pytest.raises(safe_store.TamperedFile, match="unknown entry"):
        safe_store.load(tmp_path / "p")  # a reader that does not allow Point refuses it
