"""The output folder, written atomically: everything goes into a hidden sibling folder, which
replaces OUT only once every file is complete; on any failure it is removed and OUT is as it was."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .core.errors import InputError
from .interrupt import checkpoint


def check_out_dir(out_dir: Path, overwrite: bool, inputs: tuple = (), flag: str = "-o", outputs: tuple = ()) -> None:
    """Fail before any work when OUT cannot be written as asked. ``inputs``: the paths compile
    reads (the checkpoint, the calibration file); ``outputs``: the other folders it writes. OUT may
    be none of them, nor inside one, nor hold one, since replacing OUT deletes what it held.
    ``flag``: the option that named OUT, for the message."""
    target = out_dir.resolve()
    for given, role in [(x, "input") for x in inputs] + [(x, "output folder") for x in outputs]:
        source = Path(given).resolve()
        if target == source or target in source.parents or source in target.parents:
            relation = ("is" if target == source else "holds" if target in source.parents else "is inside")
            raise InputError(f"output folder {out_dir} {relation} the {role} {given}: choose another {flag} "
                             f"(the {role} is never replaced)")
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
    try:  # what only trying shows: a read-only or refusing filesystem, root on a locked folder
        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=parent))
    except OSError as exc:
        raise InputError(f"cannot create folders beside {out_dir} ({parent}: {exc.strerror})") from None


def check_free_space(needs: list[tuple[Path, int, str]]) -> None:
    """Fail before the long work when a filesystem has less free space than what the compile
    will write to it, at least. ``needs``: (output folder, bytes at least, what they are) per
    folder written; folders on one filesystem add up."""
    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, least, what in needs:
        parent = folder.resolve().parent
        by_device.setdefault(os.stat(parent).st_dev, []).append((parent, least, what))
    for entries in by_device.values():
        least = sum(n for _, n, _ in entries)
        free = shutil.disk_usage(entries[0][0]).free
        if free < least:
            what = "; ".join(w for _, _, w in entries)
            raise InputError(f"{entries[0][0]} has {free / 2**30:.2f} GiB free, and the compile writes at least "
                             f"{least / 2**30:.2f} GiB there ({what}): free some space or choose another folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(out_dir: Path) -> list[Path]:
    """The hidden siblings a killed compile left whose process is gone: a ``.OUT.tmp-PID-*``
    (unfinished) is removed; a ``.OUT.old-PID`` (the previous OUT, set aside for the new one) is
    removed when OUT is there, and put back as OUT when the kill came between the two renames.
    Returns what was removed or put back."""
    parent = out_dir.resolve().parent
    handled = []
    for kind in ("tmp", "old"):
        for stale in parent.glob(f".{out_dir.name}.{kind}-*"):
            pid = stale.name[len(f".{out_dir.name}.{kind}-"):].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if kind == "old" and not out_dir.exists():
                stale.rename(out_dir)
            else:
                shutil.rmtree(stale, ignore_errors=True)
            handled.append(stale)
    return handled


@contextlib.contextmanager
def atomic_out_dir(out_dir: Path):
    """Yields the folder to write into; on a normal exit it becomes ``out_dir`` (replacing an old
    one), with the permissions a plain mkdir/open would have given."""
    parent = out_dir.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=parent))
    old = parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        yield tmp
        checkpoint()  # a signal swallowed while the files were written: OUT stays as it was
        _default_permissions(tmp)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:  # an error, Ctrl-C or SIGTERM: OUT as it was
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _default_permissions(folder: Path) -> None:
    """What a plain mkdir/open would have given (mkdtemp and the ONNX writer make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)
