"""A worker process: after fork, load the application and serve the shared
socket with zope.server until told to stop or the master disappears.

A worker never returns into the master's code: it leaves with os._exit.
"""
import logging
import os
import random
import signal
import time
import traceback

import psutil

from zkprefork import inifile, logsetup, proctitle
from zkprefork.supervision import MASTER_ONLY_SIGNALS
from zkprefork.worker_protocol import BootFailed, Heartbeat, Ready, RetireRequest, encode

log = logging.getLogger('zkprefork.worker')

BOOT_FAILED = 3
POLL_SECONDS = 1.0      # longest sleep of the serving loop (heartbeat period)
DRAIN_IDLE_SECONDS = 0.5  # an idle keep-alive channel this old is closed on drain


_reopen_logs = []  # SIGUSR1 seen, not yet acted on (it may come while the app loads)


def reset_signals(inherited):
    """Right after fork, before anything else: the master's handlers are not
    a worker's. Until it serves, a worker dies of SIGTERM and SIGQUIT."""
    signal.set_wakeup_fd(-1)
    for signum in inherited:
        signal.signal(signum, signal.SIG_IGN if signum in MASTER_ONLY_SIGNALS else signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, lambda signum, frame: _reopen_logs.append(signum))


class Worker:

    def __init__(self, slot, settings, listener, link, app=None):
        self.slot = slot
        self.settings = settings
        self.listener = listener
        self.link = link  # socket to the master: we report on it, EOF = master gone
        self.app = app
        self.stop_reason = None
        self.quit_now = False
        self.retire_asked = False
        self._process = psutil.Process()  # this worker, for max_memory
        # Staggered, so that workers started together are not recycled together.
        self.max_requests = settings.max_requests and (
            settings.max_requests + random.randint(0, settings.max_requests_jitter))

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
        self._tell_master(Ready(os.getpid()))
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
            self._tell_master(BootFailed(summary))
            return None

    def _start_server(self, app):
        from zkprefork import eventloop, httprequest, wakeup, zopeserver  # zopeserver: imported by the master
        self.loop = eventloop.install()  # first: every dispatcher keeps the map it was created with
        zopeserver.fresh_wakeup()
        self._install_signals(wakeup)
        wakeup.LinkWatcher(self.link, self._master_gone)
        dispatcher = zopeserver.TaskDispatcher()
        dispatcher.setThreadCount(self.settings.threads)
        hit_log = zopeserver.access_logger() if self.settings.access_log else None
        server = zopeserver.server_class(self.settings.zservertracelog)(
            self.listener, app, self.settings.name, self.settings.host, dispatcher, hit_log,
            httprequest.Limits.from_settings(self.settings))
        return server, dispatcher

    def _install_signals(self, wakeup):
        wakeup.SignalWakeup()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGQUIT, self._on_quit_signal)

    def _on_stop_signal(self, signum, frame):
        self.stop_reason = self.stop_reason or f'signal {signal.Signals(signum).name}'

    def _on_quit_signal(self, signum, frame):
        self.quit_now = True
        self.stop_reason = 'SIGQUIT'

    def _master_gone(self):
        self.stop_reason = self.stop_reason or 'the master is gone'

    def _tell_master(self, message):
        try:
            self.link.sendall(encode(message))
        except OSError:
            self._master_gone()

    def _serve(self, server):
        next_beat = 0
        while self.stop_reason is None:
            self.loop.poll(POLL_SECONDS)
            if _reopen_logs:
                _reopen_logs.clear()
                logsetup.reopen()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + POLL_SECONDS
                self._heartbeat(server)
                server.expire_stalled_requests()
                self.loop.ask_all()  # what changed channels outside the loop's handlers

    def _heartbeat(self, server):
        """Tell the master this loop is alive; ask to be replaced when worn out.

        The master replaces a worker before retiring it, so recycling never
        leaves a slot without a serving worker."""
        self._tell_master(Heartbeat(server.requests))
        if self.retire_asked:
            return
        reason = None
        if self.max_requests and server.requests >= self.max_requests:
            reason = f'served {server.requests} requests (max_requests)'
        elif self.settings.max_memory:
            rss = self._process.memory_info().rss
            if rss > self.settings.max_memory * 1024 * 1024:
                reason = f'resident memory {rss // 1048576} MB > max_memory'
        if reason:
            self.retire_asked = True
            self._tell_master(RetireRequest(reason))

    def _drain(self, server):
        """Stop accepting, then let in-flight requests finish (bounded)."""
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
            self.loop.ask_all()
            self.loop.poll(0.05)
        left = len(server.channels())
        if left:
            log.warning('worker %d (pid %d) gave up on %d connection(s) after graceful_timeout',
                        self.slot, os.getpid(), left)
