"""The pidfile: written atomically once the master runs, removed on exit.

The master holds an exclusive lock (flock(2)) on the file it wrote for as
long as it runs, and that lock, not the pid in it, is what makes a pidfile
"live": a pid can be reused by any process (a `tail -F zkprefork.log`, a
worker of another server), a lock dies with its holder. The kernel drops
it when the last descriptor goes, even after SIGKILL.

During a live upgrade (USR2) the old master's pidfile is renamed to
`<pidfile>.oldbin`, still locked by it, while the new master writes
`<pidfile>` (as gunicorn and Unicorn do); a failed upgrade renames it back.
"""
import fcntl
import os
import tempfile

from zkprefork.settings import ConfigError

_held = {}  # path -> the open, locked file this process wrote
OLDBIN = '.oldbin'


def check(path):
    """Refuse to start if a running zkprefork master holds the pidfile."""
    try:
        pid = _holder(path)
    except OSError:
        return  # missing, or not a file: write() says what is wrong with it
    if pid is not None:
        raise ConfigError(f'pidfile: {path!r} names a running zkprefork master (pid {pid})')


def _holder(path):
    """The pid in `path` if a running master holds it (its lock), else None.
    Raises OSError if it cannot be opened."""
    with open(path) as file:
        return file.read().strip() if _locked(file) else None


def _locked(file):
    try:
        fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(file, fcntl.LOCK_UN)
    return False


def write(path):
    """Write our pid to `path` (a new inode, renamed into place) and keep it
    locked until remove(). Raises ConfigError if that cannot be done."""
    directory = os.path.dirname(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix='.zkprefork-pid-')
    except OSError as error:
        raise ConfigError(f'pidfile: cannot write {path!r}: {error.strerror}') from None
    file = os.fdopen(fd, 'w')
    # Locked before it has a name, so no reader ever sees it unlocked.
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    file.write(f'{os.getpid()}\n')
    file.flush()
    os.chmod(temporary, 0o644)
    try:
        os.replace(temporary, path)
    except OSError as error:
        file.close()
        os.unlink(temporary)
        raise ConfigError(f'pidfile: cannot write {path!r}: {error.strerror}') from None
    _held[path] = file


def set_aside(path):
    """Rename our pidfile to `path`.oldbin, keeping its lock: a new master
    is about to write `path`."""
    _move(path, path + OLDBIN)


def restore(path):
    """Rename our `path`.oldbin back to `path` (over whatever a failed new
    master left there)."""
    _move(path + OLDBIN, path)


def drop_stale_oldbin(path):
    """Remove `path`.oldbin if no master holds it any more: an old master
    killed (SIGKILL) during an upgrade cannot remove its own."""
    oldbin = path + OLDBIN
    try:
        if _holder(oldbin) is None:
            os.unlink(oldbin)
    except OSError:
        pass  # none there, or gone meanwhile


def _move(source, target):
    file = _held.pop(source, None)
    if file is None:
        return
    try:
        if os.path.samestat(os.stat(source), os.fstat(file.fileno())):
            os.replace(source, target)
    except OSError:
        pass  # gone or replaced by someone else: there is nothing of ours to move
    _held[target] = file


def remove(path):
    """Remove the pidfile (or its .oldbin) if it is still ours, and let go of its lock."""
    for each in (path, path + OLDBIN):
        _remove(each)


def _remove(path):
    file = _held.pop(path, None)
    if file is None:
        return
    try:
        if os.path.samestat(os.stat(path), os.fstat(file.fileno())):
            os.unlink(path)
    except OSError:
        pass
    file.close()
