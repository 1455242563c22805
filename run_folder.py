"""A run folder (RUN_DIR) belongs to one train.py process and holds only what train.py wrote there.

- It is recognised by its marker, RUN_DIR/hicra_run.json, which only train.py writes (`claim`).
  `--out` on a folder that holds anything and is not a run (a model folder, a home directory) is
  refused, and so is `--resume` on a folder that is not a run. Runs made before the marker existed
  (a config.json of train.py's settings beside metrics.jsonl or checkpoint/) are recognised too and
  get the marker.
- One writer at a time: RUN_DIR/.lock is locked (flock) for the life of the process, with the
  holder's pid and host written in it; a second process gets one line naming the holder. The
  operating system releases the lock when its process ends, however it ends, so a lock left by a
  killed run is simply taken over.
- Files are written whole and never through a planted link: each goes to a fresh temporary file
  created exclusively under a random name in the folder and is renamed into place
  (`write_atomically`); metrics.jsonl is appended without following a link (`append_line`); a
  symbolic link where train.py keeps its files is refused with one line, and nothing outside the run
  folder is touched.
"""

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from cli import InputError

MARKER = "hicra_run.json"  # {"created_by": "train.py", ...}: this folder is a run
LOCK = ".lock"  # flock'ed by the one process writing the run; holds its pid and host
KEPT_NAMES = ("metrics.jsonl", "config.json", "placebo_grams.txt", "resumes.jsonl",
              "environment.jsonl", MARKER)  # never links


def is_run(run_dir: Path) -> bool:
    """Whether `run_dir` is a train.py run: its marker, or (runs older than the marker) a
    config.json holding train.py's settings beside metrics.jsonl or checkpoint/."""
    if (run_dir / MARKER).is_file():
        return True
    # absent, or a FIFO that reading would wait on forever
    if not (run_dir / "config.json").is_file():
        return False
    try:
        settings = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    has_run = (run_dir / "metrics.jsonl").is_file() or (run_dir / "checkpoint").is_dir()
    return (isinstance(settings, dict) and {"algo", "group_size", "steps"} <= settings.keys()
            and has_run)


def holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` already holds a run's results (a new run there would overwrite them)."""
    return (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoint").exists()


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock ("process PID on HOST (since ...)"), or None when nobody
    does."""
    try:
        # a FIFO would block
        descriptor = os.open(run_dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        return None  # not a lock anyone holds; claiming the folder refuses it
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return os.pread(descriptor, 512, 0).decode("utf-8", "replace").strip() or "another process"
    finally:
        os.close(descriptor)  # also drops the probe's shared lock


def in_use(run_dir: Path, flag: str, holder: str) -> InputError:
    return InputError(f"{flag}: {run_dir} is in use by {holder}; one process writes a run folder "
                      "at a time")


def check_out(run_dir: Path, resuming: bool, locked_here: bool = False) -> None:
    """Before anything loads: refuse an --out that is a file, that another process is writing, that
    holds a run (new run) or that is not a run (--resume), and a non-empty folder that is not a
    run."""
    flag = "--resume" if resuming else "--out"
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise InputError(f"{flag}: {run_dir} is a "
                         f"{'symbolic link' if run_dir.is_symlink() else 'file'}, not a folder")
    holder = lock_holder(run_dir) if run_dir.is_dir() and not locked_here else None
    if holder:
        raise in_use(run_dir, flag, holder)
    if resuming:
        if not is_run(run_dir):
            raise InputError(f"--resume: {run_dir} is not a train.py run folder (no {MARKER}, no "
                             "run config)")
        return
    if run_dir.exists() and holds_a_run(run_dir):
        raise InputError(f"--out: {run_dir} already holds a run; pass --resume {run_dir} or "
                         "another --out")
    if run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir()) and not is_run(run_dir):
        raise InputError(f"--out: {run_dir} is not empty and not a train.py run folder; give a new "
                         "or empty folder")


def refuse_links(run_dir: Path) -> None:
    """One line for a symbolic link where train.py keeps a file or a checkpoint: it would write
    through it."""
    names = [*KEPT_NAMES, *(p.name for p in run_dir.glob("checkpoint*")),
             *(p.name for p in run_dir.glob("samples_*"))]
    for name in names:
        if (run_dir / name).is_symlink():
            raise InputError(f"{run_dir / name}: a symbolic link where train.py keeps its own "
                             "file; a run folder holds none (remove it)")
    for name in (*KEPT_NAMES, LOCK):  # reading a FIFO would wait forever for a writer
        path = run_dir / name
        if path.exists() and not path.is_file():
            raise InputError(f"{path}: not a regular file (a folder, a FIFO or a device) where "
                             "train.py keeps its own file (remove it)")


class RunFolder:
    """The claim on a run folder for the life of a process (`claim`), as a context manager: leaving
    it releases the lock, and leaving it by an exception before the first metrics line removes a
    folder this process created (a failed start leaves no empty run folder behind)."""

    def __init__(self, run_dir: Path, created: bool, lock_fd: int):
        self.run_dir, self.created, self.lock_fd = run_dir, created, lock_fd

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.release(failed=error_type is not None)

    def release(self, failed: bool) -> None:
        """Unlock; after a failed start (no metrics line yet) a folder this process created is
        removed."""
        if failed and self.created and not (self.run_dir / "metrics.jsonl").exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
        os.close(self.lock_fd)


def claim(run_dir: Path, resuming: bool) -> RunFolder:
    """Create the folder if needed, lock it (one writer), check it again under the lock, and mark it
    a run."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out: cannot write in {run_dir}: {error.strerror}") from None
    lock_fd = lock_exclusively(run_dir, "--resume" if resuming else "--out")
    folder = RunFolder(run_dir, created, lock_fd)
    try:
        # again: another run may have started here before we locked
        check_out(run_dir, resuming, locked_here=True)
        refuse_links(run_dir)
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, (f"process {os.getpid()} on {socket.gethostname()} "
                            f"(since {time.ctime()})\n").encode(), 0)
        if not (run_dir / MARKER).is_file():
            write_atomically(run_dir / MARKER, json.dumps({"created_by": "train.py"}) + "\n")
    except BaseException:
        # found taken, or not writable: what is there is not ours to remove
        folder.release(failed=False)
        raise
    return folder


def lock_exclusively(run_dir: Path, flag: str) -> int:
    """A descriptor of RUN_DIR/.lock, created if needed and flock'ed (exclusive, not waiting): one
    writer at a time, another process holding it is refused in one line naming it. Never opened
    through a symbolic link (O_NOFOLLOW), and never a file with other names (a hard link) nor a
    FIFO, which the pid line would overwrite or wait on."""
    try:
        descriptor = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise InputError(f"{flag}: {run_dir / LOCK} is a symbolic link; remove it") from None
        raise InputError(f"{flag}: cannot write in {run_dir}: {error.strerror}") from None
    status = os.fstat(descriptor)
    if status.st_nlink > 1 or not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        what = ("a hard link to another file" if stat.S_ISREG(status.st_mode)
                else "not a regular file")
        raise InputError(f"{flag}: {run_dir / LOCK} is {what}; remove it")
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = (os.pread(descriptor, 512, 0).decode("utf-8", "replace").strip()
                  or "another process")
        os.close(descriptor)
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise in_use(run_dir, flag, holder) from None
    return descriptor


@contextmanager
def writing(folder: Path, flag: str):
    """Hold FOLDER/.lock for the block: one writer at a time (eval.py's results, say); refused in
    one line while another process (a live train.py run, another evaluation) holds it."""
    descriptor = lock_exclusively(folder, flag)
    try:
        yield
    finally:
        os.close(descriptor)


def write_atomically(path: Path, content: str | bytes) -> None:
    """Write `path` whole or not at all (text as UTF-8): a fresh temporary file (created
    exclusively, a random name, so a planted link is never opened) in the same folder, flushed to
    disk, then renamed over `path` (a link at `path` is replaced, not followed). Every file the
    project's scripts write goes through here."""
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes it private; a run's files are as open() makes them
        os.fchmod(descriptor, 0o666 & ~current_umask())
        with os.fdopen(descriptor, "wb") as file:
            file.write(content.encode("utf-8") if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_for_append(path: Path):
    """`path` opened to append text, never through a symbolic link (O_NOFOLLOW), never a FIFO or
    device (opened without blocking, then checked to be a regular file) nor a file with another name
    (a hard link)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_NONBLOCK, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise InputError(f"{path}: a symbolic link where the project keeps its own file "
                             "(remove it)") from None
        if error.errno == errno.ENXIO:  # a FIFO nobody reads
            raise InputError(f"{path}: a FIFO where the project keeps its own file "
                             "(remove it)") from None
        raise
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:
        os.close(descriptor)
        what = ("a hard link to another file" if stat.S_ISREG(status.st_mode)
                else "not a regular file")
        raise InputError(f"{path}: {what} where the project keeps its own file (remove it)")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "a", encoding="utf-8")


def append_line(path: Path, line: str) -> None:
    """Append one line to `path` (open_for_append)."""
    with open_for_append(path) as file:
        file.write(line + "\n")
