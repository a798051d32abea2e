"""The output folder, claimed and written atomically: a compile claims OUT (a ``.OUT.lock`` beside
it, made exclusively, so a second compile into it is refused at once); everything goes into a
hidden sibling folder, which replaces OUT only once every file is complete, and never an OUT that
appeared during the run unless `overwrite` was given; on any failure it is removed and OUT is as it
was."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .core.errors import InputError
from .interrupt import checkpoint


def output_path(out_dir: str | os.PathLike, option: str = "`out_dir`") -> Path:
    """OUT as compile writes it: a symbolic link is followed to the folder it names (whose parent
    holds the hidden siblings, so the final rename stays on its filesystem and the link keeps
    naming the new OUT); the current folder, or one holding it, is refused (replacing it would
    pull the folder out from under the shell that ran the compile)."""
    given = Path(out_dir)
    target = given.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise InputError(f"{option} {given} is the current folder{'' if target == here else ' or holds it'}: name a "
                         "folder of its own (OUT is replaced as a whole)")
    return target if given.is_symlink() else Path(os.path.abspath(given))


def _lock(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


@contextlib.contextmanager
def claim_out_dir(out_dir: Path, option: str = "`out_dir`"):
    """OUT is this run's until the block ends: a second compile into it (another process) is
    refused at once, not found out at the final rename. A lock a killed run left (its process
    gone) is taken over."""
    lock = _lock(out_dir)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                raise InputError(f"{option} {out_dir}: another awq-graph compile (pid {holder}) is writing it; wait for "
                                 f"it to end or choose another folder") from None
            lock.unlink(missing_ok=True)  # its run is gone
        except OSError as exc:
            raise InputError(f"cannot claim {out_dir} ({lock}: {exc.strerror})") from None
    else:
        raise InputError(f"{option} {out_dir}: another awq-graph compile is claiming it at the same moment")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield out_dir
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(os.getpid()):
                lock.unlink()


def check_out_dir(out_dir: Path, overwrite: bool, inputs: tuple = (), option: str = "`out_dir`", outputs: tuple = ()) -> None:
    """Fail before any work when OUT cannot be written as asked. ``inputs``: the paths compile
    reads (the checkpoint, the calibration file); ``outputs``: the other folders it writes. OUT may
    be none of them, nor inside one, nor hold one, since replacing OUT deletes what it held.
    ``option``: the option that named OUT, as the message names it."""
    target = out_dir.resolve()
    for given, role in [(x, "input") for x in inputs] + [(x, "output folder") for x in outputs]:
        source = Path(given).resolve()
        if target == source or target in source.parents or source in target.parents:
            relation = ("is" if target == source else "holds" if target in source.parents else "is inside")
            raise InputError(f"output folder {out_dir} {relation} the {role} {given}: choose another {option} "
                             f"(the {role} is never replaced)")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output path {out_dir} is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"output folder {out_dir} already exists and is not empty (pass `overwrite=True` to replace it)")
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
    lock = _lock(out_dir.resolve())
    with contextlib.suppress(OSError, ValueError):
        holder = int(lock.read_text().strip() or 0)
        if holder != os.getpid() and not _alive(holder):
            lock.unlink()
            handled.append(lock)
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
def atomic_out_dir(out_dir: Path, overwrite: bool = True, option: str = "`out_dir`"):
    """Yields the folder to write into; on a normal exit it becomes ``out_dir`` (replacing an old
    one only with ``overwrite``: without it, OUT was absent or empty when the run was checked, and
    an OUT with files now appeared during the run), with the
    permissions a plain mkdir/open would have given. A file that cannot be written (a full disk,
    a quota, a file-size limit) is one line naming OUT and the file."""
    parent = out_dir.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=parent))
    old = parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        try:
            yield tmp
        except OSError as exc:
            # numpy's tofile reports a short write without an errno ("20480 requested and 8192 written")
            why = (exc.strerror or errno.errorcode.get(exc.errno, "")) if exc.errno else \
                f"{exc} (a short write: the disk is full, or a file-size limit was reached)"
            where = f" ({exc.filename})" if exc.filename else ""
            raise InputError(f"writing {out_dir} failed: {why}{where}; {out_dir} is as it was") from exc
        checkpoint()  # a signal swallowed while the files were written: OUT stays as it was
        _default_permissions(tmp)
        if not overwrite and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise InputError(f"{option} {out_dir} appeared while compiling (another program made it): it was not "
                             "replaced (pass `overwrite=True` to replace it), and nothing was written")
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
