"""Atomic writes and checked reads shared by every package (a leaf: imports none of ours).

Every file plan2img writes goes through here: written to a temporary sibling and renamed into place,
so a crash or a bad input never leaves a half-written file. Folders are built in a temporary sibling
and renamed as a whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class InputError(ValueError):
    """Bad input a user can fix (a prompt, a plan, a path, a config, a checkpoint): the CLI prints its one-line
    message and exits 2. Anything else raised is a bug and shows its traceback. Every package's own input-error
    class derives from this one (a `ValueError`, so ``except ValueError`` still catches it)."""


def read_jsonl(path: str | os.PathLike, error: type[Exception] = InputError) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` for each non-blank line of a JSON-lines file; a line that is not UTF-8 or not JSON
    raises ``error`` naming the file, the line and the fault."""
    path = Path(path)
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = f"byte {raw[err.start]:#04x} at column {err.start}"
            raise error(f"{path} line {lineno}: not UTF-8 ({bad})") from None
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path} line {lineno}: not valid JSON ({err.msg})") from None


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it, which is not thread-safe


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a normal file's mode, as open() would give
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a quota: name the file (the error names only the temporary one, if any)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _normal_modes(root: Path) -> None:
    """Give what a writer left in ``root`` the modes a normal write would (some writers, e.g. recent safetensors,
    create their files 0600 through a private temporary file)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~_UMASK)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~_UMASK)


def recover_dir(path: str | os.PathLike) -> Path:
    """Finish a folder replacement a crash interrupted: `atomic_dir` moves the old folder aside, then renames the new
    one into place; killed between the two renames, ``path`` is missing and ``.<name>.old-<pid>`` holds the last
    complete version, which is moved back. Called before reading a folder that is rewritten in place (checkpoints)
    and by `atomic_dir` itself."""
    path = Path(path)
    if not path.exists():
        olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], path)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder in a temporary sibling; on success it replaces ``path``, on error it is removed.

    With ``overwrite=False`` an existing non-empty ``path`` is an error (raised before anything is built).
    """
    path = recover_dir(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if not overwrite and path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a normal folder's mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _normal_modes(tmp)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
