"""utils.atomic_io: a file or folder is either the old one or the new one, never half-written."""

from __future__ import annotations

import json
import os

import pytest

from iterppo_lightning.utils.atomic_io import (
    atomic_dir,
    atomic_path,
    atomic_symlink,
    atomic_write_json,
    atomic_write_text,
    is_temp_name,
    replace_dir,
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


def test_atomic_symlink_makes_and_replaces_a_link_and_leaves_no_temporary(tmp_path):
    for name in ("iteration_0", "iteration_1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "which").write_text(name)
    link = tmp_path / "final_policy"
    atomic_symlink("iteration_0", link)
    assert os.readlink(link) == "iteration_0" and (link / "which").read_text() == "iteration_0"
    atomic_symlink("iteration_1", link)  # replaces the existing link
    assert os.readlink(link) == "iteration_1" and (link / "which").read_text() == "iteration_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_policy", "iteration_0", "iteration_1"]


def test_atomic_symlink_removes_its_temporary_when_the_swap_fails(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(OSError):  # a link cannot replace a non-empty folder
        atomic_symlink("elsewhere", tmp_path / "taken")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_replace_dir_moves_a_folder_onto_an_existing_one(tmp_path):
    target, new = tmp_path / "ckpt", tmp_path / ".ckpt.tmp-zero"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "w").write_text(text)
    replace_dir(new, target)
    assert (target / "w").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    new.mkdir()
    replace_dir(new, tmp_path / "fresh")  # no folder to replace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "fresh"]


def test_replace_dir_cut_between_its_renames_leaves_the_old_folder_to_put_back(tmp_path, monkeypatch):
    from iterppo_lightning.loop.run_state import remove_stale_temporaries

    target, new = tmp_path / "ckpt", tmp_path / ".ckpt.tmp-zero"
    for folder, text in ((target, "old"), (new, "partial")):
        folder.mkdir()
        (folder / "w").write_text(text)
    real_replace, calls = os.replace, []

    def killed_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, target)
    monkeypatch.undo()
    assert not target.exists() and any(".ckpt.old-" in p.name for p in tmp_path.iterdir())
    remove_stale_temporaries(tmp_path)  # what a resume does: the old checkpoint comes back, the partial one goes
    assert (target / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_is_temp_name():
    assert is_temp_name(".a.json.tmp.json") and is_temp_name(".policy.old-1234abcd")
    assert not is_temp_name("a.json") and not is_temp_name(".hidden")
