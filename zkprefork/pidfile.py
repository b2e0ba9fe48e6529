"""The pidfile: written atomically once the master runs, removed on exit."""
import os
import tempfile

import psutil

from zkprefork.settings import ConfigError


def _live_master(pid):
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and any(
            'zkprefork' in part for part in process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def check(path):
    """Refuse to start if the pidfile names a live zkprefork master."""
    try:
        with open(path) as file:
            pid = int(file.read().strip())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        return  # unreadable or garbage: stale, replaced by write()
    if pid != os.getpid() and _live_master(pid):
        raise ConfigError(f'pidfile: {path!r} names a running zkprefork master (pid {pid})')


def write(path):
    directory = os.path.dirname(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix='.zkprefork-pid-')
    except OSError as error:
        raise ConfigError(f'pidfile: cannot write {path!r}: {error.strerror}') from None
    with os.fdopen(fd, 'w') as file:
        file.write(f'{os.getpid()}\n')
    os.chmod(temporary, 0o644)
    try:
        os.replace(temporary, path)
    except OSError as error:
        os.unlink(temporary)
        raise ConfigError(f'pidfile: cannot write {path!r}: {error.strerror}') from None


def remove(path):
    """Remove the pidfile if it is still ours."""
    try:
        with open(path) as file:
            if file.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass
