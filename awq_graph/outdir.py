"""The output folder, written atomically: everything goes into a hidden sibling folder, which
replaces OUT only once every file is complete; on any failure it is removed and OUT is as it was."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .core.errors import InputError


def check_out_dir(out_dir: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """Fail before any work when OUT cannot be written as asked. ``inputs``: the paths compile
    reads (the checkpoint, the calibration file); OUT may be none of them, nor inside one, nor
    hold one, since replacing OUT deletes what it held."""
    target = out_dir.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target in source.parents or source in target.parents:
            relation = ("is" if target == source else "holds" if target in source.parents else "is inside")
            raise InputError(f"output folder {out_dir} {relation} the input {given}: choose another -o "
                             "(the input is never replaced)")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output path {out_dir} is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"output folder {out_dir} already exists and is not empty (pass --overwrite to replace it)")
    parent = target.parent
    if not parent.exists():
        raise InputError(f"the parent folder of {out_dir} does not exist")
    if not parent.is_dir():
        raise InputError(f"the parent of {out_dir} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"the parent folder of {out_dir} is not writable")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(out_dir: Path) -> list[Path]:
    """The hidden siblings a killed compile left (``.OUT.tmp-PID-*``, ``.OUT.old-PID``) whose
    process is gone: removed; returns them."""
    parent = out_dir.resolve().parent
    removed = []
    for kind in ("tmp", "old"):
        for stale in parent.glob(f".{out_dir.name}.{kind}-*"):
            pid = stale.name[len(f".{out_dir.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_out_dir(out_dir: Path):
    """Yields the folder to write into; on a normal exit it becomes ``out_dir`` (replacing an old
    one), with the permissions a plain mkdir/open would have given. What an earlier, killed run
    left beside ``out_dir`` is removed first."""
    parent = out_dir.resolve().parent
    remove_stale(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=parent))
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
