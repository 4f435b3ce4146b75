"""Where artifacts are cached, and how they are written: atomically, so a crash never leaves half a file."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """$LAYERBOOST_CACHE, else ~/.cache/layerboost."""
    root = Path(os.environ.get("LAYERBOOST_CACHE", Path.home() / ".cache" / "layerboost"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def content_hash(*parts) -> str:
    """A short hash of JSON-serialisable parts (sorted keys), used to key cached artifacts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _fresh_beside(path: Path, make) -> Path:
    """Create a new hidden sibling of `path` with `make(name)`; retry on the rare name collision."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


# The temporary file/folder is created with the ordinary default mode (0o666 / 0o777) and the kernel applies
# the process umask (or the folder's default ACL) at creation, exactly as for any file the user writes; the
# rename keeps that mode. tempfile.mkstemp/mkdtemp would force 0600/0700 and leave every artifact private.
def _new_file(tmp: Path) -> None:
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The file ends with the user's default mode (0o666 less the umask), like any file they write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_beside(path, _new_file)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: Path):
    """Like `atomic_path` for a folder: written under a temporary name, renamed when complete.

    The folder ends with the user's default mode (0o777 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_beside(path, lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
