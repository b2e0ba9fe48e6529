"""The master: a single-threaded loop that keeps N workers serving the shared
socket, tells the registrar when to (un)register, and stops in order.

It sleeps in one place, `selector.select()`, woken by signals (through
signal.set_wakeup_fd), by worker messages and by registrar events; a timeout
is only ever the next scheduled deadline (a respawn back-off, a stop step).
It never imports kazoo or zope.server and never calls the application.
"""
import collections
import logging
import os
import selectors
import signal
import socket
import time

from zkprefork import listener as listening
from zkprefork import proctitle
from zkprefork.worker import Worker

log = logging.getLogger('zkprefork.master')

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                   signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)
UNREGISTER_WAIT = 5.0  # seconds the node deletion may take before workers stop anyway
REGISTRAR_EXIT_WAIT = 5.0
KILL_GRACE = 5.0  # beyond graceful_timeout, before workers are killed
MAX_BACKOFF = 30.0

# Phases, in the order a master goes through them.
BOOTING, RUNNING, UNREGISTERING, DRAINING, CLOSING, DONE = (
    'booting', 'running', 'unregistering', 'draining', 'closing', 'done')


class WorkerProcess:
    """The master's view of one worker: its slot, pid and message link."""

    def __init__(self, slot, pid, link):
        self.slot = slot
        self.pid = pid
        self.link = link
        self.started = time.monotonic()
        self.ready = False
        self.boot_error = None
        self._buffer = b''

    def messages(self):
        """Lines the worker sent since the last call; None once it closed the link."""
        try:
            chunk = self.link.recv(65536)
        except BlockingIOError:
            return []
        except OSError:
            chunk = b''
        if not chunk:
            return None
        lines = (self._buffer + chunk).split(b'\n')
        self._buffer = lines.pop()
        return [line.decode(errors='replace') for line in lines]


def describe_exit(status):
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f'killed by {signal.Signals(-code).name}'
    return f'exit status {code}'


class Master:

    def __init__(self, settings, listener, app=None, registrar=None):
        self.settings = settings
        self.listener = listener
        self.port = listening.bound_port(listener)
        self.app = app  # a preloaded application, or None: workers load it
        self.registrar = registrar
        self.phase = BOOTING
        self.exit_status = 0
        self.workers = {}  # pid -> WorkerProcess
        self.failures = collections.Counter()  # slot -> consecutive boot failures
        self.not_before = {}  # slot -> monotonic time before which it is not respawned
        self.deadline = None  # when the current stop phase gives up waiting
        self.signals = collections.deque()
        self.selector = selectors.DefaultSelector()
        self._wakeup_fds = ()

    # -- the loop --------------------------------------------------------

    def run(self):
        proctitle.set(f'master {self.settings.config_file or ""} '
                      f'{listening.format_address(self.settings.host or "0.0.0.0", self.port)}')
        self._install_signals()
        if self.registrar:
            self._start_registrar()
        log.info('master (pid %d) listening at %s, starting %d worker(s) of %d thread(s)',
                 os.getpid(), self.url(), self.settings.workers, self.settings.threads)
        try:
            while self.phase != DONE:
                self._step()
                if self.phase == DONE:
                    break
                for key, _ in self.selector.select(self._timeout()):
                    key.data()
        finally:
            self._uninstall_signals()
        log.info('master (pid %d) exiting with status %d', os.getpid(), self.exit_status)
        return self.exit_status

    def _step(self):
        """Everything the loop does after waking, in an order that is safe to
        repeat: handle signals, reap children, then converge on the phase."""
        while self.signals:
            self._on_signal(self.signals.popleft())
        self._reap()
        getattr(self, '_step_' + self.phase)()

    def _timeout(self):
        times = [self.deadline] if self.deadline else []
        if self.phase in (BOOTING, RUNNING):
            times += [t for slot, t in self.not_before.items() if slot not in self._busy_slots()]
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def url(self):
        host = self.settings.host or '0.0.0.0'
        return 'http://' + listening.format_address(host, self.port)

    # -- signals ---------------------------------------------------------

    def _install_signals(self):
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        self._wakeup_fds = (read_end, write_end)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self.selector.register(read_end, selectors.EVENT_READ, self._drain_wakeup)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._queue_signal)

    def _queue_signal(self, signum, frame):
        # Runs between bytecodes in this (the only) thread; the wake-up fd
        # has already made select() return.
        self.signals.append(signum)

    def _drain_wakeup(self):
        try:
            os.read(self._wakeup_fds[0], 4096)
        except BlockingIOError:
            pass

    def _uninstall_signals(self):
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        for fd in self._wakeup_fds:
            os.close(fd)
        self._wakeup_fds = ()

    def _on_signal(self, signum):
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info('%s: stopping gracefully', signal.Signals(signum).name)
            self._begin_stop()
        elif signum == signal.SIGQUIT:
            log.info('SIGQUIT: stopping now')
            self._quit()
        elif signum == signal.SIGCHLD:
            pass  # _step reaps after every wake-up
        else:
            log.info('%s ignored', signal.Signals(signum).name)

    # -- workers ---------------------------------------------------------

    def _busy_slots(self):
        return {worker.slot for worker in self.workers.values()}

    def _converge(self):
        """Start a worker in every empty slot whose back-off has passed."""
        now = time.monotonic()
        busy = self._busy_slots()
        for slot in range(self.settings.workers):
            if slot not in busy and self.not_before.get(slot, 0) <= now:
                self._spawn(slot)

    def _spawn(self, slot):
        master_end, worker_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            master_end.close()
            self._forget_in_child()
            Worker(slot, self.settings, self.listener, worker_end, self.app).run()
        worker_end.close()
        master_end.setblocking(False)
        worker = WorkerProcess(slot, pid, master_end)
        self.workers[pid] = worker
        self.not_before.pop(slot, None)
        self.selector.register(master_end, selectors.EVENT_READ, lambda: self._on_worker_message(worker))
        log.info('worker %d started (pid %d)', slot, pid)

    def _forget_in_child(self):
        """In a new worker: drop everything that is the master's alone, so that
        end of file on those pipes keeps meaning 'the master died'."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        fds = list(self._wakeup_fds) + [w.link.fileno() for w in self.workers.values()]
        if self.registrar:
            fds += self.registrar.child_fds()
        self.selector.close()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _forget(self, fileobj):
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass  # already forgotten at end of file

    def _on_worker_message(self, worker):
        messages = worker.messages()
        if messages is None:
            self._forget(worker.link)
            return
        for message in messages:
            kind, _, rest = message.partition(' ')
            if kind == 'ready':
                worker.ready = True
                log.info('worker %d (pid %d) ready', worker.slot, worker.pid)
            elif kind == 'boot-failed':
                worker.boot_error = rest

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.registrar and pid == self.registrar.pid:
                self._registrar_exited(status)
            elif pid in self.workers:
                self._worker_exited(self.workers.pop(pid), status)

    def _worker_exited(self, worker, status):
        self._on_worker_message(worker)  # what it said last
        self._forget(worker.link)
        worker.link.close()
        how = describe_exit(status)
        if self.phase in (BOOTING, RUNNING) and not worker.ready:
            self._boot_failed(worker, how)
        elif self.phase in (BOOTING, RUNNING):
            log.warning('worker %d (pid %d) exited: %s; restarting it', worker.slot, worker.pid, how)
            self.failures[worker.slot] = 0
        else:
            log.info('worker %d (pid %d) exited: %s', worker.slot, worker.pid, how)

    def _boot_failed(self, worker, how):
        reason = worker.boot_error or how
        if self.phase == BOOTING:
            log.error('worker %d (pid %d) failed to boot: %s', worker.slot, worker.pid, reason)
            self.exit_status = 1
            self._begin_stop()
            return
        self.failures[worker.slot] += 1
        delay = min(MAX_BACKOFF, 0.5 * 2 ** (self.failures[worker.slot] - 1))
        self.not_before[worker.slot] = time.monotonic() + delay
        log.error('worker %d (pid %d) failed to boot: %s; retrying in %.1f s',
                  worker.slot, worker.pid, reason, delay)

    def _signal_workers(self, signum):
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # -- registrar -------------------------------------------------------

    def _start_registrar(self):
        self.registrar.start()
        self.selector.register(self.registrar.fileno(), selectors.EVENT_READ, self._on_registrar_events)

    def _on_registrar_events(self):
        events = self.registrar.events()
        if events is None:
            self._forget(self.registrar.fileno())
            return
        for event in events:
            if event['event'] == 'unregistered' and self.phase == UNREGISTERING:
                self._stop_workers(signal.SIGTERM)

    def _registrar_exited(self, status):
        if not self.registrar.process.stdout.closed:
            self._on_registrar_events()
            self._forget(self.registrar.fileno())
        self.registrar.exited(status)
        if self.phase in (BOOTING, RUNNING):
            log.error('the registrar (pid %d) exited: %s; restarting it',
                      self.registrar.pid, describe_exit(status))
            registered = self.registrar.registered
            self._start_registrar()
            if registered:
                self._register()

    def _register(self):
        data = {'pid': os.getpid(), 'workers': self.settings.workers}
        nodes = {listening.format_address(host, self.port): data
                 for host in listening.advertised_hosts(self.settings.host)}
        self.registrar.register(nodes)

    # -- phases ----------------------------------------------------------

    def _step_booting(self):
        self._converge()
        workers = self.workers.values()
        if len(workers) == self.settings.workers and all(w.ready for w in workers):
            self.phase = RUNNING
            log.info('%d worker(s) ready, serving at %s', len(workers), self.url())
            if self.registrar:
                self._register()
            else:
                log.warning('no zookeeper option: serving unregistered')

    def _step_running(self):
        self._converge()

    def _begin_stop(self):
        if self.phase not in (BOOTING, RUNNING):
            return
        if self.registrar and self.registrar.registered:
            self.phase = UNREGISTERING
            self.deadline = time.monotonic() + UNREGISTER_WAIT
            self.registrar.unregister()
        else:
            self._stop_workers(signal.SIGTERM)

    def _quit(self):
        if self.registrar:
            self.registrar.close()  # the session closes, the node goes with it
        self._stop_workers(signal.SIGQUIT)
        self.deadline = time.monotonic() + KILL_GRACE

    def _stop_workers(self, signum):
        """Stop accepting (the master's copy of the socket goes too, so no
        connection waits in a backlog nobody serves) and let workers drain."""
        self.phase = DRAINING
        self.deadline = time.monotonic() + self.settings.graceful_timeout + KILL_GRACE
        self._signal_workers(signum)
        self.listener.close()

    def _step_unregistering(self):
        if time.monotonic() >= self.deadline:
            log.warning('ZooKeeper did not confirm the deregistration in time; stopping anyway')
            self._stop_workers(signal.SIGTERM)

    def _step_draining(self):
        if self.workers and time.monotonic() >= self.deadline:
            log.error('%d worker(s) still running after graceful_timeout: killing them', len(self.workers))
            self._signal_workers(signal.SIGKILL)
            self.deadline = None
        if self.workers:
            return
        self.phase = CLOSING
        self.deadline = time.monotonic() + REGISTRAR_EXIT_WAIT
        if self.registrar and self.registrar.process.returncode is None:
            self.registrar.close()
        else:
            self.phase = DONE

    def _step_closing(self):
        if self.registrar.process.returncode is not None:
            self.phase = DONE
        elif time.monotonic() >= self.deadline:
            log.error('the registrar did not exit in time: killing it')
            os.kill(self.registrar.pid, signal.SIGKILL)
            self.deadline = None
