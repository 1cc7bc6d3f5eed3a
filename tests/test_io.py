"""neox_zoology.io: a file is written whole or not at all, synced before it is renamed into place."""
from __future__ import annotations

import json
import os

import pytest

from neox_zoology import io


def test_writes_create_the_folder_and_leave_no_temporary(tmp_path):
    target = tmp_path / "a" / "b" / "doc.json"
    io.atomic_write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1} and target.read_text().endswith("}\n")
    io.atomic_write_text(target, "é\n")
    assert target.read_bytes() == "é\n".encode("utf-8")
    io.atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["doc.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "doc.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with io.atomic_path(target, temp_suffix=".partial-1") as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt"]


def test_a_failing_encoder_leaves_no_file(tmp_path):
    target = tmp_path / "doc.json"
    with pytest.raises(TypeError):
        io.atomic_write_json(target, {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_the_new_content_is_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(io.os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    io.atomic_write_text(tmp_path / "doc.txt", "new")
    assert events[:2] == ["fsync", "replace"]  # the file, then the rename (then its folder, where possible)
    assert (tmp_path / "doc.txt").read_text() == "new"


def test_a_path_written_by_name_is_renamed_into_place(tmp_path):
    target = tmp_path / "weights.bin"
    with io.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        with open(tmp, "wb") as f:
            f.write(b"abc")
        assert not target.exists()  # nothing at the name until the block is done
    assert target.read_bytes() == b"abc"
