"""Atomic writes leave normal file and folder modes (what open() and mkdir() give under the umask)."""

import os
import stat

import safeio


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_leave_normal_modes(tmp_path):
    f = safeio.atomic_write_text(tmp_path / "a.txt", "x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(f) == _mode(plain)
    with safeio.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "inside.json").write_text("{}")
        private = tmp / "private.safetensors"  # as a writer with a private temporary file leaves it
        private.write_bytes(b"x")
        private.chmod(0o600)
    (tmp_path / "plain_dir").mkdir()
    assert _mode(tmp_path / "d") == _mode(tmp_path / "plain_dir")
    assert _mode(tmp_path / "d" / "private.safetensors") == _mode(plain)  # was: 0600 kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
