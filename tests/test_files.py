"""dac._files: atomic writes, copies of one file."""
from __future__ import annotations

import os

import pytest

from dac._files import atomic_write, first_copy, write_json


def test_never_touches_the_umask(tmp_path, monkeypatch):
    # os.umask(0) ... os.umask(old) would give files created meanwhile by other threads mode 0666
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    write_json(tmp_path / "a.json", {"x": 1})
    assert calls == []
    umask = real(0o022)
    real(umask)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~umask


def test_an_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")

    def fail(fh):
        fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_creates_the_folder(tmp_path):
    atomic_write(tmp_path / "new" / "deep" / "f.bin", lambda fh: fh.write(b"\x00\x01"))
    assert (tmp_path / "new" / "deep" / "f.bin").read_bytes() == b"\x00\x01"


def test_first_copy_compares_whole_files_of_equal_size(tmp_path):
    def write(name, data):
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    start = bytes(range(256)) * 8
    a = write("a", start + b"tail-1")
    b = write("b", start + b"tail-2")  # same size and start (past the chunk), other end
    c = write("c", start + b"tail-1x")  # another size
    e1, e2 = write("e1", b""), write("e2", b"")  # empty: no image, left to the reader
    f = write("f", start[:300] + b"X" + start[301:] + b"tail-1")  # a's samples (start, middle, end), not a's bytes
    assert first_copy([a, b, c, e1, e2, f], chunk=64) is None
    d = write("d", start + b"tail-2")
    assert first_copy([a, b, c, d, f], chunk=64) == (b, d)
    assert first_copy([a, b, c, d]) == (b, d)  # the whole file within the samples
