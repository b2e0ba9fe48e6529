"""From checked Settings to a running master: logging, pidfile, the socket,
the registrar, then the master's loop. Shared by the command line and the
PasteDeploy server runner."""
import logging
import os
import resource
import sys

from zkprefork import inifile, listener, logsetup, pidfile
from zkprefork.master import Master
from zkprefork.registrar_link import RegistrarLink
from zkprefork.settings import ConfigError

log = logging.getLogger('zkprefork.master')


def start(make_settings, app=None):
    """Run a master; return its exit status. A ConfigError, raised by
    `make_settings()` or while starting, is one line on stderr and status 2,
    with nothing bound, registered or forked."""
    try:
        settings = make_settings()
        return serve(settings, app, reload_settings=make_settings)
    except ConfigError as error:
        print(f'zkprefork: error: {error}', file=sys.stderr)
        return 2


def serve(settings, app=None, reload_settings=None):
    logsetup.configure(settings.loggers, settings.access_log)
    if settings.pidfile:
        pidfile.check(settings.pidfile)
    _raise_fd_limit()
    sock = listener.bind(settings.host, settings.port)
    try:
        if settings.preload and app is None:
            app = _preload(settings)
            if app is None:
                return 1
        if settings.pidfile:
            pidfile.write(settings.pidfile)
        registrar = RegistrarLink(settings) if settings.registered else None
        return Master(settings, sock, app, registrar, reload_settings).run()
    finally:
        sock.close()
        if settings.pidfile:
            pidfile.remove(settings.pidfile)


def _preload(settings):
    """Load the application once, in the master, to share it copy-on-write.
    (The master still never calls it.)"""
    try:
        return inifile.load_app(settings.config_file, settings.app_name)
    except Exception:
        log.exception('cannot load the application (preload)')
        return None


def _raise_fd_limit():
    """Each keep-alive connection holds an fd in a worker: allow as many as the
    hard limit does (inherited by the workers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug('raised the open file limit from %d to %d (pid %d)', soft, hard, os.getpid())
