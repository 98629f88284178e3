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


def test_a_crash_between_the_two_renames_of_a_folder_replacement_is_recovered(tmp_path):
    """Killed after moving the old folder aside and before renaming the new one in: the old one comes back."""
    target = tmp_path / "checkpoint"
    with safeio.atomic_dir(target) as tmp:
        (tmp / "state.json").write_text('{"step": 2}')
    os.replace(target, tmp_path / ".checkpoint.old-12345")  # the first rename, then the process died
    assert safeio.recover_dir(target) == target and (target / "state.json").read_text() == '{"step": 2}'
    os.replace(target, tmp_path / ".checkpoint.old-12345")
    with safeio.atomic_dir(target) as tmp:  # the next write recovers it first, then replaces it as usual
        (tmp / "state.json").write_text('{"step": 4}')
    assert (target / "state.json").read_text() == '{"step": 4}'
    assert not list(tmp_path.glob(".checkpoint.old-*"))
