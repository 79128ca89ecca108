"""How an export's files reach its directory: the export owns only its own files.

The export directory may be shared with anything else (``output_dir`` with HF checkpoints,
Lightning's ``default_root_dir``, the working directory ``"."``, a mount point): nothing is
renamed or deleted there but the plugin's own files.

- A lock file (``.palettize-export.lock``, holding the writer's pid) is ``flock``-ed for the
  whole export: two exports to one directory run one after the other; the kernel releases the
  lock when its process dies (kill -9 included), so a lock nobody holds means no live owner.
- Files are staged in ``.palettize-export.<pid>.<id>.partial/`` inside the directory (same file
  system: every move is a rename), fsync-ed, then committed: a journal naming the staged entries
  is written, each entry is ``os.replace``-d into place (a directory, such as ``model.aimodel``,
  is swapped through a ``.<name>.<pid>.<id>.old`` rename), the files the previous export listed
  and this one does not write are removed, and ``palettize_export.json`` (the completion
  manifest: which files form the export) is written last. A commit interrupted by a crash is
  finished by the next reader or writer (the journal is only written once every staged file is
  on disk), so a reader never sees a mix of two exports.
- Debris of dead exports (``.partial``, ``.old``, a journal) is removed by the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["COMPLETION_NAME", "LOCK_NAME", "check_export_dir", "export_lock", "finish_interrupted",
           "staged_export"]

log = logging.getLogger(__name__)

COMPLETION_NAME = "palettize_export.json"
COMPLETION_FORMAT = "coreai-palettize-plugins/export-v1"
LOCK_NAME = ".palettize-export.lock"
JOURNAL_NAME = ".palettize-export.journal"
_STAGING = re.compile(r"^\.palettize-export\.(\d+)\.[0-9a-f]+\.partial$")
_ASIDE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]+\.(old|tmp)$")

_held_locks: list[int] = []
"""File descriptors of the export locks this process holds (a forked child closes them)."""


def check_export_dir(directory: str | os.PathLike, *, key: str = "export.dir") -> Path:
    """Refuse a directory the export cannot write to (before training): it must be a directory,
    or not exist yet below a writable directory. Creates nothing.

    Raises:
        PalettizeConfigError: naming ``palettize.<key>``.
    """
    from ..core.checks import PalettizeConfigError

    path = Path(directory).expanduser()
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            raise PalettizeConfigError(key, f"{path} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        what = "is" if probe == path.absolute() else f"is below {probe}, which is"
        raise PalettizeConfigError(key, f"{path} {what} a file, not a directory: choose a "
                                        "directory (it may hold other files; they are kept)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PalettizeConfigError(key, f"{path}: {probe} is not writable by this user")
    return path


@contextlib.contextmanager
def export_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s export lock (waiting, with a log line, for a live holder)."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            log.warning("palettize export: %s is being exported by process %s; waiting for it "
                        "to finish", directory, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks.append(fd)
        try:
            yield
        finally:
            _held_locks.remove(fd)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def close_inherited_locks() -> None:
    """In a forked child: drop the parent's lock descriptors (the parent keeps its lock)."""
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_debris(directory: Path) -> None:
    """Remove staging dirs, swapped-out copies and temp files of exports that died (called with
    the lock held: no live export owns any of them; the pid in the name is logged)."""
    for entry in directory.iterdir():
        match = _STAGING.match(entry.name) or _ASIDE.match(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        log.info("palettize export: removing %s left by %s process %d", entry.name,
                 "a live (pid reused?)" if _alive(pid) else "dead", pid)
        _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_completion(directory: Path) -> dict[str, Any] | None:
    """The completion manifest of the export in ``directory`` (None: none, or unreadable)."""
    try:
        data = json.loads((directory / COMPLETION_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _apply_journal(directory: Path, journal: Mapping[str, Any]) -> None:
    """Move the staged entries into place, remove the previous export's leftovers, write the
    completion manifest. Idempotent: re-running it after a crash finishes the same commit."""
    staging = directory / journal["staging"]
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    for name in journal["entries"]:
        source, target = staging / name, directory / name
        if not source.exists() and not source.is_symlink():
            continue  # moved before the crash
        if source.is_dir() and (target.exists() or target.is_symlink()):
            aside = directory / f".{name}.{tag}.old"
            os.replace(target, aside)
            os.replace(source, target)
            _remove(aside)
        else:
            os.replace(source, target)
    for name in journal["remove"]:
        target = directory / name
        if target.exists() or target.is_symlink():
            aside = directory / f".{name}.{tag}.old"
            os.replace(target, aside)
            _remove(aside)
    _write_json_atomic(directory / COMPLETION_NAME, journal["completion"])
    _fsync_path(directory)
    with contextlib.suppress(FileNotFoundError):
        (directory / JOURNAL_NAME).unlink()
    _fsync_path(directory)
    _remove(staging)


def _recover(directory: Path) -> None:
    """With the lock held: finish a commit a dead export left, then remove debris."""
    try:
        journal = json.loads((directory / JOURNAL_NAME).read_text())
    except FileNotFoundError:
        journal = None
    except ValueError:  # a journal is written atomically; unreadable means not ours
        journal = None
        log.warning("palettize export: ignoring an unreadable %s", directory / JOURNAL_NAME)
    if journal is not None:
        log.warning("palettize export: finishing the commit of an export to %s that was "
                    "interrupted (process %s)", directory, journal.get("pid", "?"))
        _apply_journal(directory, journal)
    _clean_debris(directory)


def finish_interrupted(directory: str | os.PathLike, *, wait_s: float = 120.0) -> None:
    """For readers: if an export's commit is in progress or was interrupted in ``directory``,
    wait for it or finish it, so what is read is one complete export."""
    directory = Path(directory)
    if not (directory / JOURNAL_NAME).exists():
        return
    deadline = time.monotonic() + wait_s
    while (directory / JOURNAL_NAME).exists():
        try:
            fd = os.open(directory / LOCK_NAME, os.O_RDWR)
        except OSError as e:
            raise RuntimeError(f"{directory}: an export's commit was interrupted and the "
                               f"directory cannot be locked ({e}); run the export again or "
                               "open the directory with write access to finish it") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live export is committing: it takes milliseconds
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{directory}: an export has been committing for "
                                       f"{wait_s:.0f} s") from None
                time.sleep(0.05)
                continue
            _recover(directory)
        finally:
            os.close(fd)


def _free_space_hint(directory: Path) -> str:
    with contextlib.suppress(OSError):
        st = os.statvfs(directory)
        return f" ({st.f_bavail * st.f_frsize / 2**20:.1f} MiB free on that file system)"
    return ""


class StagedExport:
    """The staging directory of one export (``path``) and what to commit from it."""

    def __init__(self, directory: Path, path: Path, previous: dict[str, Any] | None) -> None:
        self.directory, self.path, self.previous = directory, path, previous
        self.export_id = uuid.uuid4().hex
        self.keep: set[str] = set()
        """Files of the previous export to keep (a failed format's earlier artifact)."""
        self.formats: dict[str, Any] = {}
        self.commit_enabled = True
        self.journal_written = False

    def previous_file(self, name: str) -> Path | None:
        """The earlier export's ``name`` in the directory, if there is one."""
        target = self.directory / name
        return target if (target.exists() and not target.is_symlink()) else None

    def _completion(self, entries: list[str]) -> dict[str, Any]:
        previous_files = (self.previous or {}).get("files", {})
        files = {name: {"export_id": self.export_id} for name in entries}
        for name in self.keep:
            if name not in files and (self.directory / name).exists():
                files[name] = previous_files.get(name, {"export_id": None})
        return {"format": COMPLETION_FORMAT, "export_id": self.export_id,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "pid": os.getpid(), "formats": self.formats, "files": files}

    def commit(self) -> None:
        """fsync the staged files, then move them into place (see the module docstring)."""
        _apply_umask(self.path)
        fsync_tree(self.path)
        entries = sorted(p.name for p in self.path.iterdir())
        previous_files = set((self.previous or {}).get("files", {}))
        remove = sorted(previous_files - set(entries) - self.keep - {COMPLETION_NAME})
        journal = {"staging": self.path.name, "entries": entries, "remove": remove,
                   "pid": os.getpid(), "completion": self._completion(entries)}
        _write_json_atomic(self.directory / JOURNAL_NAME, journal)
        self.journal_written = True
        _fsync_path(self.directory)
        _apply_journal(self.directory, journal)


@contextlib.contextmanager
def staged_export(directory: str | os.PathLike) -> Iterator[StagedExport]:
    """Lock ``directory`` (created if needed), clean what dead exports left, and yield a staging
    area inside it; on success (and ``commit_enabled``) its files replace the export's files.
    On any failure nothing in ``directory`` changes but the staging area's removal."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"palettize export: {directory} is not a directory") from e
    journal_written = False
    try:
        with export_lock(directory):
            _recover(directory)
            staging = directory / f".palettize-export.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
            staged: StagedExport | None = None
            try:
                staging.mkdir()
                staged = StagedExport(directory, staging, read_completion(directory))
                yield staged
                if staged.commit_enabled:
                    staged.commit()
            finally:
                journal_written = staged is not None and staged.journal_written
                if not journal_written:  # else the journal needs it to finish the commit
                    _remove(staging)
    except OSError as e:
        if e.errno == errno.ENOSPC and not journal_written:
            raise OSError(e.errno, f"palettize export to {directory}: no space left on "
                          f"device{_free_space_hint(directory)}; the previous export there "
                          "is unchanged") from e
        raise


def _apply_umask(root: Path) -> None:
    """mkdtemp and some writers create owner-only files: give the result normal permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
