"""From checked Settings to a running master: logging, pidfile, the socket,
the registrar, then the master's loop. Shared by the command line and the
PasteDeploy server runner."""
import dataclasses
import logging
import os
import resource
import signal
import sys

from zkprefork import addresses, inifile, logsetup
from zkprefork.master import listener, monitor, pidfile, systemd, upgrade
from zkprefork.master.loop import Master
from zkprefork.master.registrar_link import NoRegistrar, RegistrarLink
from zkprefork.master.signalqueue import HANDLED_SIGNALS, STOP_SIGNALS, SignalQueue, StopBeforeServing
from zkprefork.settings import ConfigError

log = logging.getLogger('zkprefork.master')


def start(make_settings, app=None):
    """Run a master; return its exit status. A ConfigError, raised by
    `make_settings()` or while starting, is one line on stderr and status 2,
    with nothing bound, registered or forked. A stop signal before the loop
    runs (while a preloaded application loads) is status 0, nothing left."""
    signals = SignalQueue(HANDLED_SIGNALS, stops=STOP_SIGNALS)
    try:
        # First: HUP or USR1 would otherwise kill the master while it loads.
        # In the try: a stop held since the command's first line (signalqueue.hold)
        # arrives as install() unblocks it.
        signals.install()
        settings = make_settings()
        return serve(settings, signals, app, reload_settings=make_settings)
    except ConfigError as error:
        print(f'zkprefork: error: {error}', file=sys.stderr)
        return 2
    except StopBeforeServing as stop:
        log.info('%s: stopping before serving', signal.Signals(stop.signum).name)
        return 0
    finally:
        signals.uninstall()


def serve(settings, signals, app=None, reload_settings=None):
    logsetup.configure(settings.loggers, settings.access_log)
    log.debug('settings: %s', settings)  # paths and names only: no secret is ever in Settings
    inherited = upgrade.Inherited.from_environment()  # an old master started us (USR2)
    if settings.pidfile:
        pidfile.check(settings.pidfile)
    _raise_fd_limit()
    sock, settings, reload_settings = _listen(settings, reload_settings, inherited)
    monitor_sock = None
    try:
        if settings.monitor_server:
            monitor_sock = ((inherited and inherited.monitor_for(settings.monitor_server))
                            or monitor.bind(*settings.monitor_server))
        if settings.preload and app is None:
            app = _preload(settings)
            if app is None:
                return 1
        if settings.pidfile:
            pidfile.write(settings.pidfile)
        link = RegistrarLink(settings) if settings.registers else NoRegistrar()
        watch = monitor.Monitor(monitor_sock) if monitor_sock else monitor.NoMonitor()
        return Master(settings, sock, signals, app, link, reload_settings, watch, inherited).run()
    finally:
        sock.close()
        if monitor_sock:
            monitor_sock.close()
        if settings.pidfile:
            pidfile.remove(settings.pidfile)


def _listen(settings, reload_settings, inherited=None):
    """The listening socket: the old master's (a live upgrade), systemd's
    (socket activation) or our own.

    With an inherited one, host and port are what that socket is bound to,
    on every reload too."""
    sock = inherited.listener if inherited else systemd.activated_socket()
    if sock is None:
        return listener.bind(settings.host, settings.port), settings, reload_settings
    host, port = sock.getsockname()[:2]
    actual = {'host': '' if addresses.is_wildcard(host) else host, 'port': port}
    log.info('serving the socket passed by %s (%s)', 'the old master' if inherited else 'systemd',
             addresses.format_address(host, port))
    reload_actual = reload_settings and (lambda: dataclasses.replace(reload_settings(), **actual))
    return sock, dataclasses.replace(settings, **actual), reload_actual


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
