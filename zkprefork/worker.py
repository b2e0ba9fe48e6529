"""A worker process: after fork, load the application and serve the shared
socket with zope.server until told to stop or the master disappears.

A worker never returns into the master's code: it leaves with os._exit.
"""
import logging
import os
import signal
import time
import traceback

from zkprefork import inifile, proctitle

log = logging.getLogger('zkprefork.worker')

BOOT_FAILED = 3
POLL_SECONDS = 1.0      # longest sleep of the serving loop (heartbeat period)
DRAIN_IDLE_SECONDS = 0.5  # an idle keep-alive channel this old is closed on drain


class Worker:

    def __init__(self, slot, settings, listener, link, app=None):
        self.slot = slot
        self.settings = settings
        self.listener = listener
        self.link = link  # socket to the master: we report on it, EOF = master gone
        self.app = app
        self.stop_reason = None
        self.quit_now = False

    def run(self):
        """Called in the child right after fork; never returns."""
        status = 0
        try:
            status = self._run()
        except BaseException:
            log.exception('worker %d (pid %d) crashed', self.slot, os.getpid())
            status = 1
        finally:
            logging.shutdown()
            os._exit(status)

    def _run(self):
        proctitle.set(f'worker {self.slot} {self.settings.config_file or ""}'.rstrip())
        app = self._load_app()
        if app is None:
            return BOOT_FAILED
        server, dispatcher = self._start_server(app)
        self._tell_master(f'ready {os.getpid()}')
        log.info('worker %d (pid %d) serving', self.slot, os.getpid())
        self._serve(server)
        self._drain(server)
        dispatcher.shutdown(cancel_pending=True, timeout=1)
        log.info('worker %d (pid %d) stopped: %s', self.slot, os.getpid(), self.stop_reason)
        return 0

    def _load_app(self):
        if self.app is not None:
            return self.app
        try:
            return inifile.load_app(self.settings.config_file, self.settings.app_name)
        except Exception as error:
            log.error('worker %d (pid %d) cannot load the application: %s\n%s',
                      self.slot, os.getpid(), error, traceback.format_exc().rstrip())
            summary = traceback.format_exception_only(error)[-1].strip()
            self._tell_master(f'boot-failed {summary}')
            return None

    def _start_server(self, app):
        # zope.server only now, after fork (see zopeserver's docstring).
        from zope.server.taskthreads import ThreadedTaskDispatcher

        from zkprefork import zopeserver, wakeup
        zopeserver.fresh_wakeup()
        self._install_signals(wakeup)
        wakeup.LinkWatcher(self.link, self._master_gone)
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.setThreadCount(self.settings.threads)
        server = zopeserver.SharedSocketServer(
            self.listener, app, self.settings.name, self.settings.host, dispatcher)
        return server, dispatcher

    def _install_signals(self, wakeup):
        wakeup.SignalWakeup()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGQUIT, self._on_quit_signal)
        # The master alone decides on Ctrl-C, so that the node goes first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_stop_signal(self, signum, frame):
        self.stop_reason = self.stop_reason or f'signal {signal.Signals(signum).name}'

    def _on_quit_signal(self, signum, frame):
        self.quit_now = True
        self.stop_reason = 'SIGQUIT'

    def _master_gone(self):
        self.stop_reason = self.stop_reason or 'the master is gone'

    def _tell_master(self, message):
        try:
            self.link.sendall(message.encode() + b'\n')
        except OSError:
            self._master_gone()

    def _serve(self, server):
        import asyncore
        while self.stop_reason is None:
            asyncore.poll2(POLL_SECONDS)

    def _drain(self, server):
        """Stop accepting, then let in-flight requests finish (bounded)."""
        import asyncore
        server.stop_accepting()
        if self.quit_now:
            return
        deadline = time.monotonic() + self.settings.graceful_timeout
        while not self.quit_now and time.monotonic() < deadline:
            now = time.time()
            channels = server.channels()
            for channel in channels:
                if not channel.busy() and channel.last_activity < now - DRAIN_IDLE_SECONDS:
                    channel.close()
            if not server.channels():
                return
            asyncore.poll2(0.05)
        left = len(server.channels())
        if left:
            log.warning('worker %d (pid %d) gave up on %d connection(s) after graceful_timeout',
                        self.slot, os.getpid(), left)
