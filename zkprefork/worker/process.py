"""A worker process: after fork, load the application and serve the shared
socket with zope.server until told to stop or the master disappears.

A worker never returns into the master's code: it leaves with os._exit.
"""
import logging
import os
import random
import signal
import sys
import time
import traceback

import psutil

from zkprefork import clock, inifile, logsetup, proctitle
from zkprefork.worker import balance, scoreboard
from zkprefork.supervision import MASTER_ONLY_SIGNALS
from zkprefork.worker.protocol import BootFailed, Heartbeat, Ready, RetireRequest, encode

log = logging.getLogger('zkprefork.worker')

BOOT_FAILED = 3
POLL_SECONDS = 1.0      # longest sleep of the serving loop (heartbeat period)
# A worker that stops with the server closes a keep-alive connection idle
# this long; one that retires while others serve (a reload, SIGTTOU,
# recycling) keeps it for a keep-alive timeout, so that a client sending its
# next request on it gets an answer (with Connection: close), not a reset.
STOP_IDLE_SECONDS = 0.5
RETIRE_KEEPALIVE_SECONDS = 5.0


_reopen_logs = []  # SIGUSR1 seen, not yet acted on (it may come while the app loads)


def reset_signals(inherited):
    """Right after fork, before anything else: the master's handlers are not
    a worker's. Until it serves, a worker dies of SIGTERM and SIGQUIT."""
    signal.set_wakeup_fd(-1)
    for signum in inherited:
        signal.signal(signum, signal.SIG_IGN if signum in MASTER_ONLY_SIGNALS else signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, lambda signum, frame: _reopen_logs.append(signum))


class Worker:

    def __init__(self, slot, settings, listener, link, record, app=None, tls_context=None):
        """`record`: this worker's scoreboard.Record; `tls_context`: the
        master's SSLContext (None without TLS), made before the fork so that
        every worker shares its session ticket keys: a client resumes its
        TLS session on whichever worker accepts it next."""
        self.slot = slot
        self.settings = settings
        self.listener = listener
        self.tls_context = tls_context
        self.link = link  # socket to the master: we report on it, EOF = master gone
        self.app = app
        self.stop_reason = None
        self.quit_now = False
        self.retire_asked = False
        self.worn_out = None  # (limit, reason) it wants a replacement for; set by any thread
        self._overdue = set()  # (thread ident, started) of the requests logged as past request_timeout
        self.server = None
        self._wake_loop = None
        self._process = psutil.Process()  # this worker, for max_memory
        self.score = scoreboard.Scorekeeper(record, self._request_started)
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
        self.score.starting(os.getpid(), self.settings.threads)
        app = self._load_app()
        if app is None:
            return BOOT_FAILED
        server, dispatcher = self._start_server(app, self.tls_context)
        self.server = server
        self.score.set_state(scoreboard.SERVING)
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

    def _start_server(self, app, tls_context):
        from zkprefork.worker import eventloop, httprequest, wakeup, zopeserver  # zopeserver: imported by the master
        self.loop = eventloop.install()  # first: every dispatcher keeps the map it was created with
        zopeserver.fresh_wakeup()
        self._wake_loop = zopeserver.wake_loop
        self._install_signals(wakeup)
        wakeup.LinkWatcher(self.link, self._master_gone)
        dispatcher = zopeserver.TaskDispatcher()
        dispatcher.setThreadCount(self.settings.threads)
        hit_log = zopeserver.access_logger() if self.settings.access_log else None
        server = zopeserver.server_class(self.settings.zservertracelog)(
            self.listener, app, self.settings.name, self.settings.host, dispatcher, hit_log,
            httprequest.HTTPOptions.from_settings(self.settings), self.score, tls_context)
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
            self.score.loop_turned()  # before the first poll too: others see this worker live
            accepting = self.score.decide_accepting()
            self.loop.poll(POLL_SECONDS if accepting else balance.DEFER_POLL_SECONDS)
            self._retire_if_worn_out()
            if _reopen_logs:
                _reopen_logs.clear()
                logsetup.reopen()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + POLL_SECONDS
                self._heartbeat()
                server.expire_stalled_requests()
                self.loop.ask_all()  # what changed channels outside the loop's handlers

    def _heartbeat(self):
        """Tell the master this loop is alive; check max_memory and request_timeout."""
        self._tell_master(Heartbeat(self.score.requests))
        if not self.worn_out and self.settings.max_memory:
            rss = self._process.memory_info().rss
            if rss > self.settings.max_memory * 1024 * 1024:
                self._wear_out('max_memory', f'resident memory {rss // 1048576} MB > max_memory')
        if self.settings.request_timeout:
            self._check_request_timeout(self.settings.request_timeout)

    def _check_request_timeout(self, limit, replace=True):
        """A request running longer than `limit` seconds: log where each
        such thread is stuck (its Python stack), once per request, whatever
        the worker is doing (already worn out, draining); and, with
        `replace`, ask to be replaced. The thread is not interrupted (Python
        cannot), so the worker drains and is killed after graceful_timeout
        like any other."""
        now = time.monotonic()
        overdue = [(number, started, request, ident)
                   for number, started, request, ident in self.score.record.busy()
                   if now - started > limit and (ident, started) not in self._overdue]
        if not overdue:
            return
        frames = sys._current_frames()
        for number, started, request, ident in overdue:
            self._overdue.add((ident, started))
            frame = frames.get(ident)
            stack = ''.join(traceback.format_stack(frame)).rstrip() if frame else '(the thread is gone)'
            log.error('worker %d (pid %d): request %r has run for %.1f s (request_timeout %g s) '
                      'in thread %d; its stack:\n%s',
                      self.slot, os.getpid(), request, now - started, limit, number, stack)
        if replace and not self.worn_out:
            self._wear_out('request_timeout', f'a request ran longer than request_timeout: {overdue[0][2]}')

    def _request_started(self, count):
        """In the pool thread about to run the `count`th request: max_requests
        is checked here, so that the worker stops taking requests at once."""
        if count == self.max_requests:
            self._wear_out('max_requests', f'served {count} requests (max_requests)')

    def _wear_out(self, limit, reason):
        """From any thread: responses end keep-alive from now on (this one's
        too), and the loop asks for a replacement at once."""
        self.worn_out = (limit, reason)
        self.server.draining = True
        self._wake_loop()

    def _retire_if_worn_out(self):
        """Ask to be replaced, once. Until the replacement is ready (the
        master replaces a worker before retiring it, so recycling never
        leaves a slot unserved), responses end keep-alive and new
        connections go to other workers (see scoreboard.Scorekeeper.may_accept)."""
        if self.worn_out and not self.retire_asked:
            self.retire_asked = True
            self.score.set_state(scoreboard.WORN)
            self._tell_master(RetireRequest(*self.worn_out))

    def _drain(self, server):
        """Stop accepting, then let in-flight requests finish (bounded)."""
        self.score.set_state(scoreboard.RETIRING)
        server.stop_accepting()
        if self.quit_now:
            return
        deadline = time.monotonic() + self.settings.graceful_timeout
        while not self.quit_now and time.monotonic() < deadline:
            stopping = self.score.record.board.header.stopping
            idle_limit = STOP_IDLE_SECONDS if stopping else RETIRE_KEEPALIVE_SECONDS
            now = clock.now()
            for channel in server.channels():
                if not channel.busy() and channel.idle_for(now) > idle_limit:
                    channel.close()
            if not server.channels():
                return
            if self.settings.request_timeout:
                self._check_request_timeout(self.settings.request_timeout, replace=False)
            self.loop.ask_all()
            self.loop.poll(0.05)
        left = len(server.channels())
        if left:
            log.warning('worker %d (pid %d) gave up on %d connection(s) after graceful_timeout',
                        self.slot, os.getpid(), left)
