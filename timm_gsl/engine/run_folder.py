"""One run per output folder: a folder that holds a run is only written by a run resuming it, one at a time.

A run's folder is *owned* once it holds a run's files (``args.yaml``, ``summary.csv`` or a checkpoint). A new
run may create a folder or use an empty one; a run that resumes from a checkpoint inside the folder may
continue it. :func:`claim_run_folder` takes an exclusive lock on the folder for the life of the run (an
``flock`` on the folder itself, released by the kernel when the process ends, however it ends), so two live
runs never interleave their files, and removes the hidden temporary files a killed run left behind.

Messages name the options by keyword (``folder``, ``resume``, and ``experiment`` / ``output`` for the two
ways to choose another folder); the functions take ``names`` (:mod:`timm_gsl.naming`), through which train.py
names its flags (``--output/--experiment``, ``--resume``).
"""
from __future__ import annotations

import errno
import fcntl
import os
from typing import List, Optional

from ..naming import Names, option_name

__all__ = ['RUN_FILES', 'RunFolder', 'RunFolderError', 'check_run_folder', 'claim_run_folder', 'run_files']

RUN_FILES = ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar')
_CHECKPOINT_SUFFIXES = ('.pth.tar', '.pth', '.safetensors')


class RunFolderError(ValueError):
    """The run may not write into its output folder (another run owns it or is writing there, or it is read-only)."""


def run_files(folder: str) -> List[str]:
    """The files in ``folder`` that say a run wrote there (sorted); [] for a missing or empty folder."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):  # not there yet, or under a file (refused by the caller)
        return []
    return sorted(n for n in names if n in RUN_FILES or (not n.startswith('.') and n.endswith(_CHECKPOINT_SUFFIXES)))


def _resumes_here(folder: str, resume: Optional[str]) -> bool:
    return bool(resume) and os.path.dirname(os.path.abspath(resume)) == os.path.abspath(folder)


def _another_folder(names: Names) -> str:
    """How the messages say to choose another folder: ``experiment (or output)``, or through ``names``."""
    return f"{option_name('experiment', names)} (or {option_name('output', names)})"


def check_run_folder(folder: str, resume: Optional[str] = None, *, names: Names = None) -> None:
    """Refuse a folder another run owns (unless resuming from a checkpoint in it) or that cannot be written.

    Cheap, and meant to run before anything is built; :func:`claim_run_folder` repeats it under the lock.

    Args:
        folder: the run's output folder.
        resume: the checkpoint the run resumes from, if any (a checkpoint inside ``folder`` continues its run).
        names: keyword -> how the messages name it (train.py passes its flags, and as ``folder`` how the user
            named the folder); default: the keyword (``folder``, ``resume``, ``experiment``, ``output``).

    Raises:
        RunFolderError: one line naming the folder, what it holds and the two ways on.
    """
    flag = option_name('folder', names)
    owned = run_files(folder)
    if owned and not _resumes_here(folder, resume):
        shown = ', '.join(owned[:4]) + (', ...' if len(owned) > 4 else '')
        raise RunFolderError(f'{flag}: {folder!r} already holds a run ({shown}); a new run never writes into another '
                             f"run's folder: pass {option_name('resume', names)} "
                             f"{os.path.join(folder, 'last.pth.tar')} to continue it, or choose another "
                             f'{_another_folder(names)}.')
    existing = folder
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if os.path.exists(existing) and (not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK)):
        what = 'is not a folder' if not os.path.isdir(existing) else 'is not writable'
        raise RunFolderError(f'{flag}: {existing!r} {what}; expected a folder this user can write the run into.')


class RunFolder:
    """The lock on a run's folder; :meth:`release` (or process exit) lets another run in."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self._fd: Optional[int] = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim_run_folder(folder: str, resume: Optional[str] = None, *, names: Names = None) -> RunFolder:
    """Create ``folder`` if needed, lock it for this process, and check that this run may write there.

    Args:
        folder: the run's output folder.
        resume: the ``--resume`` checkpoint, if any (a checkpoint inside ``folder`` continues its run).
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword (``folder``,
            ``resume``, ``experiment``, ``output``).

    Returns:
        The held lock.

    Raises:
        RunFolderError: another live run holds the folder, or it holds another run (see :func:`check_run_folder`).
    """
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderError(f"{option_name('folder', names)}: another live run is writing into {folder!r}; two "
                                 f'runs never share a folder: wait for it to end, or choose another '
                                 f'{_another_folder(names)}.') from None
        raise
    try:
        check_run_folder(folder, resume, names=names)
    except RunFolderError:
        os.close(fd)
        raise
    _remove_stale_temporaries(folder)
    return RunFolder(folder, fd)


def _remove_stale_temporaries(folder: str) -> None:
    # atomic_path's hidden '.<name>.<random>.tmp' files: under the lock, none belongs to a live writer.
    for name in os.listdir(folder):
        if name.startswith('.') and name.endswith('.tmp'):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
