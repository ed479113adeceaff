"""utils.atomic_io: a file or folder is either the old one or the new one, never half-written."""

from __future__ import annotations

import json
import os

import pytest

from iterppo_lightning.utils.atomic_io import (
    atomic_dir,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    is_temp_name,
)


def test_atomic_write_text_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]
    assert os.stat(target).st_mode & 0o777 == 0o644


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert is_temp_name(tmp.name) and tmp.suffix == ".json"
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_json_refuses_an_unserialisable_object_before_touching_the_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"path": tmp_path, "set": {2, 1}})
    assert json.loads(target.read_text()) == {"path": str(tmp_path), "set": [1, 2]}
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text())["set"] == [1, 2]


def test_atomic_dir_swaps_a_folder_and_refuses_to_overwrite_unless_asked(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(FileExistsError, match="model"), atomic_dir(target):
        pass
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "w").write_text("half")
        raise RuntimeError("crash")
    assert (target / "w").read_text() == "old"
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_is_temp_name():
    assert is_temp_name(".a.json.tmp.json") and is_temp_name(".policy.old-1234abcd")
    assert not is_temp_name("a.json") and not is_temp_name(".hidden")
