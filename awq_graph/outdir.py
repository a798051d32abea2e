"""The output folder, written atomically: everything goes into a hidden sibling folder, which
replaces OUT only once every file is complete; on any failure it is removed and OUT is as it was."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .core.errors import InputError


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail before any work when OUT cannot be written as asked."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise InputError(f"output folder {out_dir} already exists and is not empty (pass --overwrite to replace it)")
    if not out_dir.parent.exists():
        raise InputError(f"the parent folder of {out_dir} does not exist")


@contextlib.contextmanager
def atomic_out_dir(out_dir: Path):
    """Yields the folder to write into; on a normal exit it becomes ``out_dir`` (replacing an old
    one), with the permissions a plain mkdir/open would have given."""
    parent = out_dir.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if out_dir.exists():
            old = parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(folder: Path) -> None:
    """What a plain mkdir/open would have given (mkdtemp and the ONNX writer make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)
