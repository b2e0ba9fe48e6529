"""The ZooKeeper credentials file as the master last validated it.

The master opens the `zookeeper_credentials_file` when its settings are
made (at start) and again at each good reload, and keeps the fd open; every
registrar it starts inherits it and reads the secret from it. So a
registrar started to replace one that died can do what the one it replaces
could, even once the file has been deleted or replaced (a secret rotated or
unmounted); a rotated secret counts from the next reload.

The master never reads the secret: every worker (which runs the
application) is a fork of the master and inherits its memory, so the
secret stays out of it. Workers close the fd after fork (child_fds).
"""
import logging
import os

log = logging.getLogger('zkprefork.master')


class HeldCredentials:
    """An fd of the credentials file (O_RDONLY, close-on-exec: only the
    registrars get it, by pass_fds), or None without a file."""

    def __init__(self, settings):
        self.fd = None
        self.hold(settings)

    def hold(self, settings):
        """Open the file of `settings` (validated Settings) in place of the
        one held. If it cannot be opened (it went since it was validated),
        the one held stays, and the error is logged."""
        path = settings.zookeeper_credentials_file
        if path is None:
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            log.error('cannot open the ZooKeeper credentials file %s: %s; %s', path, error.strerror,
                      'registrars keep the one opened before' if self.fd is not None
                      else 'each registrar tries to open it itself')
            return
        self.release()
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def fds(self):
        """[fd] to pass to a registrar and close in a worker; [] without one."""
        return [] if self.fd is None else [self.fd]
