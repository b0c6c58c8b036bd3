"""Atomic writes: the whole file or the old one, never half; the usual file mode; no leftovers."""

from __future__ import annotations

import json
import os

import pytest

from edgedistill.fileio import atomic_write, write_json, write_text


def test_write_json_and_text_are_whole_readable_and_leave_nothing_behind(tmp_path):
    write_json(tmp_path / "a" / "x.json", {"k": 1})
    write_text(tmp_path / "a" / "x.md", "# x\n")
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": 1}
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a" / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json", "x.md"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"old": True})

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write('{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
