"""Writing output files so that a failure loses nothing and leaves nothing behind.

Every output goes to a temporary file in the destination folder and is renamed over the destination only
when complete. Temporary files follow one naming rule, `.NAME.reparam-tmp-PID-XXXXXXXX[.ext]`, so that

- an error while writing (a full disk, a file-size limit, permissions) becomes one `OutputError` naming the
  output and the cause, with the temporary file removed;
- SIGTERM or SIGINT during a write removes the temporary files before the process ends (SIGINT raises
  KeyboardInterrupt as usual; a SIGTERM with the default action still ends the process, by that signal);
- what a crash (SIGKILL, power loss) left behind is recognised the next time the same output is written:
  the leftovers of processes no longer running are removed, with a warning that says so.

Writers that take a file object get one from `output_file`, which remembers the OS error behind a failed
write: torch's C++ writers report only "unexpected pos", and torch.jit/torch.export abort the process on
a failed write to a path (a C++ exception in a destructor) but not on a write to a Python file.
"""
from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import secrets
import signal
import stat
import threading
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

from .errors import OutputError, ReparamError, first_line

__all__ = ["TEMP_MARK", "FolderBusy", "lock_folder", "open_regular_file", "model_file_name_problem", "atomic_write", "atomic_write_file", "output_file", "temp_path_for", "leftover_temp_files",
           "check_output_path", "same_file"]

PathLike = Union[str, os.PathLike]

TEMP_MARK = ".reparam-tmp-"
_LEGACY = re.compile(r"^\.(?P<base>.+)\.[A-Za-z0-9_]{8}\.tmp(?P<ext>\.[^.]*)?$")  # mkstemp names of versions <= 0.x

_lock = threading.Lock()
_active: Dict[str, None] = {}  # temporary files being written now, by any thread
_failed: Dict[str, OSError] = {}  # temporary file -> the OS error a write into it raised
_previous_handlers: Dict[int, object] = {}


# -- paths --------------------------------------------------------------------------------------------------

class FolderBusy(ReparamError):
    """Another process holds the folder's lock (`lock_folder`)."""


def lock_folder(path: PathLike) -> Optional[int]:
    """An exclusive flock on the folder `path` itself, for as long as the returned descriptor stays open (it
    dies with the process: nothing stale after a crash, no lock file). Raises FolderBusy when another process
    holds it; returns None on a file system without flock (some network mounts), where the caller runs
    unguarded."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(f"{path}: another process is using this folder") from None
    except OSError:
        os.close(fd)
        return None
    return fd


def check_output_path(path: PathLike, inputs: Sequence[PathLike] = ()) -> None:
    """A clear error, before any work, when `path` cannot be written as a file or is one of `inputs`."""
    path = os.fspath(path)
    if not path:
        raise ReparamError("the output path is empty")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ReparamError(f"'{path}' is a directory, expected an output file path")
    if not os.path.isdir(folder):
        raise ReparamError(f"folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise ReparamError(f"folder '{folder}' is not writable")
    for source in inputs:
        if same_file(path, os.fspath(source)):
            raise ReparamError(f"'{path}' is an input; refusing to overwrite it")


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file or folder (the same path, when either does not exist yet)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def temp_path_for(path: PathLike) -> str:
    """A fresh temporary name next to `path` under the naming rule; it keeps the extension (torch.export
    checks it)."""
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    ext = os.path.splitext(base)[1]
    return os.path.join(folder, f".{base}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{ext}")


def leftover_temp_files(path: PathLike) -> List[str]:
    """Temporary files of earlier writes of `path` whose process is no longer running (a crash's leftovers)."""
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    ext = os.path.splitext(base)[1]
    ours = re.compile(rf"^\.{re.escape(base)}{re.escape(TEMP_MARK)}(?P<pid>\d+)-[0-9a-f]+{re.escape(ext)}$")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in names:
        full = os.path.join(folder, name)
        match = ours.match(name)
        if match:
            if full in _active or _running(int(match.group("pid"))):
                continue  # being written now, by this process or another one
            found.append(full)
        else:
            legacy = _LEGACY.match(name)
            if legacy and legacy.group("base") == base and (legacy.group("ext") or "") == ext:
                found.append(full)
    return sorted(found)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it (it is not active): a leftover of an earlier process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(path: str) -> None:
    removed = []
    for leftover in leftover_temp_files(path):
        try:
            os.remove(leftover)
            removed.append(os.path.basename(leftover))
        except OSError:
            pass
    if removed:
        warnings.warn(f"removed {len(removed)} temporary file(s) left next to {path} by an interrupted earlier "
                      f"write: {', '.join(removed)}", stacklevel=3)


# -- writing ------------------------------------------------------------------------------------------------

def atomic_write(path: PathLike, write: Callable[[str], None]) -> str:
    """Write `path` atomically: `write(tmp)` writes the temporary file, which replaces `path` when complete.
    OS errors become one `OutputError`; the temporary file never outlives a failure or a SIGTERM/SIGINT."""
    path = os.fspath(path)
    check_output_path(path)
    _write(path, write)
    return path


def atomic_write_file(path: PathLike, write: Callable[[io.BufferedWriter], None]) -> str:
    """`atomic_write` for writers that take a binary file object (`torch.save(obj, f)`): the file records
    the OS error behind a failed write, which torch's C++ writers do not report themselves."""
    def to_file(tmp: str) -> None:
        with output_file(tmp) as f:
            write(f)

    return atomic_write(path, to_file)


def output_file(tmp: str) -> io.BufferedWriter:
    """A binary file for writing `tmp` that remembers the OS error of a failed write (see the module doc)."""
    return _RecordingFile(tmp)


class _RecordingFile(io.BufferedWriter):
    def __init__(self, path: str):
        super().__init__(io.FileIO(path, "w"))
        self._record_as = path

    def _recording(self, call, *args):
        """`call(*args)`; its OSError is kept (the first one per file) before it propagates."""
        try:
            return call(*args)
        except OSError as e:
            with _lock:
                _failed.setdefault(self._record_as, e)
            raise

    def write(self, data):
        return self._recording(super().write, data)

    def flush(self):
        return self._recording(super().flush)

    def close(self):
        return self._recording(super().close)


def _write(path: str, write: Callable[[str], None]) -> None:
    _clean_leftovers(path)
    tmp = temp_path_for(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or first_line(e)}") from None
    _register(tmp)
    try:
        try:
            write(tmp)
            os.chmod(tmp, _file_mode(path))
            os.replace(tmp, path)
        except Exception as e:
            error = _output_error(path, tmp, e)
            if error is None:
                raise
            raise error from None
    finally:
        try:
            os.remove(tmp)  # gone already after a successful rename
        except FileNotFoundError:
            pass
        except OSError:
            pass
        with _lock:
            _failed.pop(tmp, None)
        _unregister(tmp)


def _output_error(path: str, tmp: str, error: Exception) -> Optional[OutputError]:
    """The one-line OutputError an exception from a writer stands for, or None when it is no write failure."""
    with _lock:
        recorded = _failed.get(tmp)
    if isinstance(error, OutputError):
        return error
    if recorded is not None:
        return OutputError(f"cannot write {path}: {recorded.strerror or first_line(recorded)}")
    if isinstance(error, OSError):
        return OutputError(f"cannot write {path}: {error.strerror or first_line(error)}")
    text = str(error)
    code = re.search(r"\(os error (\d+)\)", text)  # Rust's io::Error (safetensors)
    if code:
        return OutputError(f"cannot write {path}: {os.strerror(int(code.group(1)))}")
    if isinstance(error, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter|file write failed", text):
        # torch's zip writer to a path says no more than this; a full disk is the usual cause
        cause = _probe_space(path) or f"the write failed ({first_line(error)})"
        return OutputError(f"cannot write {path}: {cause}")
    return None


def _probe_space(path: str) -> Optional[str]:
    try:
        stats = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    return os.strerror(errno.ENOSPC) if stats.f_bavail == 0 else None


def _file_mode(path: str) -> int:
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# -- signals ------------------------------------------------------------------------------------------------

def _register(tmp: str) -> None:
    with _lock:
        _active[tmp] = None
    if threading.current_thread() is not threading.main_thread():
        return  # handlers can only be set from the main thread; one set by a main-thread write covers all
    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if current is not _on_signal and current is not None:
            _previous_handlers[sig] = current
            signal.signal(sig, _on_signal)


def _unregister(tmp: str) -> None:
    with _lock:
        _active.pop(tmp, None)
        idle = not _active
    if not idle or threading.current_thread() is not threading.main_thread():
        return
    for sig, previous in list(_previous_handlers.items()):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, previous)
        del _previous_handlers[sig]


def _on_signal(signum, frame) -> None:
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        # Python's KeyboardInterrupt (the write's cleanup then runs as the exception unwinds), or a handler
        # of the caller's, such as a training run's graceful stop, which lets the write finish
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    # the default action ends the process at once: the temporary files go first
    with _lock:
        leftovers = list(_active)
    for tmp in leftovers:
        try:
            os.remove(tmp)
        except OSError:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def model_file_name_problem(path: PathLike, has_architecture: bool) -> Optional[str]:
    """Why `path` is a wrong name for a model file, or None: the name must say what the file holds,
    `.safetensors` for a model with an architecture (a reparam model file), `.pt`/`.pth` for one without
    (a whole-module pickle)."""
    lower = os.fspath(path).lower()
    if has_architecture and not lower.endswith(".safetensors"):
        return "the model is written as a safetensors model file; name it <name>.safetensors"
    if not has_architecture and not lower.endswith((".pt", ".pth")):
        return "a model without a rebuildable architecture is written as a whole-module pickle; name it <name>.pt"
    return None


def open_regular_file(path: str):
    """`open(path, "rb")` for a regular file only, without blocking on anything else (a FIFO put in place of
    an image after the folder was listed): OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        if hasattr(os, "O_NONBLOCK"):  # no effect on regular files; cleared so the file behaves as open() gives it
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
