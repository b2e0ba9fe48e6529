"""The master: a single-threaded loop that keeps N workers serving the shared
socket, tells the registrar when to (un)register, and stops in order.

It sleeps in one place, `selector.select()`, woken by signals (through
signal.set_wakeup_fd), by worker messages and by registrar events; a timeout
is only ever the next deadline (a respawn back-off, a boot or heartbeat
limit, a stop step). It never imports kazoo or zope.server and never calls
the application.

Workers live in numbered slots. Every wake-up ends in `_converge()`, an
idempotent step towards "every slot has one up-to-date, ready worker": it
fills empty slots, replaces stale workers one at a time (a replacement must
be ready before the worker it replaces is retired), and retires surplus
slots. Reloads, resizing and recycling are all just ways of making workers
stale or slots surplus.
"""
import collections
import dataclasses
import gc
import json
import logging
import os
import selectors
import signal
import socket
import time
import uuid

import psutil

import zkprefork
from zkprefork import listener as listening
from zkprefork import logsetup, proctitle, systemd
from zkprefork.monitor import Monitor
from zkprefork.settings import RESTART_ONLY, ConfigError
from zkprefork.worker import Worker, reset_signals

log = logging.getLogger('zkprefork.master')

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                   signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)
UNREGISTER_WAIT = 5.0  # seconds the node deletion may take before workers stop anyway
REGISTRAR_EXIT_WAIT = 5.0
KILL_GRACE = 5.0  # beyond graceful_timeout, before a draining worker is killed
MAX_BACKOFF = 30.0
REGISTRAR_STEADY = 60.0  # seconds a registrar runs before its exit is not "at start"
NEVER = float('inf')

# Phases, in the order a master goes through them.
BOOTING, RUNNING, UNREGISTERING, DRAINING, CLOSING, DONE = (
    'booting', 'running', 'unregistering', 'draining', 'closing', 'done')


class WorkerProcess:
    """The master's view of one worker."""

    def __init__(self, slot, pid, link, generation):
        self.slot = slot
        self.pid = pid
        self.link = link
        self.generation = generation
        self.started = self.last_seen = time.monotonic()
        self.ready = False
        self.boot_error = None
        self.requests = 0
        self.wants_replacement = None  # the reason it gave
        self.retiring = False
        self.kill_at = NEVER  # when the master gives up on it
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
        self.last_seen = time.monotonic()
        lines = (self._buffer + chunk).split(b'\n')
        self._buffer = lines.pop()
        return [line.decode(errors='replace') for line in lines]

    def kill(self, reason):
        log.error('worker %d (pid %d) %s: killing it', self.slot, self.pid, reason)
        self.kill_at = NEVER
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def describe_exit(status):
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f'killed by {signal.Signals(-code).name}'
    return f'exit status {code}'


class Master:

    def __init__(self, settings, listener, app=None, registrar=None, reload_settings=None,
                 monitor_sock=None):
        self.settings = settings
        self.listener = listener
        self.port = listening.bound_port(listener)
        self.app = app  # a preloaded application, or None: workers load it
        self.registrar = registrar
        self.reload_settings = reload_settings  # () -> Settings, re-reading the config
        self.phase = BOOTING
        self.exit_status = 0
        self.workers = {}  # pid -> WorkerProcess
        self.worker_count = settings.workers  # TTIN/TTOU change it
        self.generation = 0  # bumped by every reload
        self.reload_halted = False  # a replacement failed to boot: keep the old workers
        self.failures = collections.Counter()  # slot or 'registrar' -> failures in a row
        self.not_before = {}  # slot or 'registrar' -> no start before this monotonic time
        self.deadline = None  # when the current stop phase gives up waiting
        self.signals = collections.deque()
        self.selector = selectors.DefaultSelector()
        self._wakeup_fds = ()
        self._registered_data = None
        self.instance = uuid.uuid4().hex  # tells this master's nodes from any other's
        self.started_at = time.monotonic()
        self.running_since = None
        self.registration = {'state': 'connecting' if registrar else 'off', 'nodes': []}
        self.monitor_sock = monitor_sock
        self.monitor = None
        self.notifier = systemd.Notifier()

    # -- the loop --------------------------------------------------------

    def run(self):
        proctitle.set(f'master {self.settings.config_file or ""} '
                      f'{listening.format_address(self.settings.host or "0.0.0.0", self.port)}')
        self._install_signals()
        if self.monitor_sock:
            self.monitor = Monitor(self.monitor_sock, self.selector, self._monitor_commands(), self.status)
            log.info('monitor listening at %s', self.monitor_address())
        if self.registrar:
            self._start_registrar()
        log.info('master (pid %d) listening at %s, starting %d worker(s) of %d thread(s)',
                 os.getpid(), self.url(), self.worker_count, self.settings.threads)
        try:
            while True:
                self._step()
                if self.phase == DONE:
                    break
                for key, _ in self.selector.select(self._timeout()):
                    key.data()
        finally:
            self._uninstall_signals()
            if self.monitor:
                self.monitor.close()
        log.info('master (pid %d) exiting with status %d', os.getpid(), self.exit_status)
        return self.exit_status

    def _step(self):
        """All the loop does after waking, in an order that is safe to repeat:
        handle signals, reap children, enforce deadlines, advance the phase."""
        while self.signals:
            self._on_signal(self.signals.popleft())
        self._reap()
        self._enforce_deadlines()
        if self.monitor:
            self.monitor.expire(time.monotonic())
        # A step may move to the next phase, whose step is then due at once:
        # nothing else would wake the loop for it.
        phase = None
        while phase != self.phase and self.phase != DONE:
            phase = self.phase
            getattr(self, '_step_' + phase)()
        self.notifier.update(self._systemd_state(), self._status_line())

    def _timeout(self):
        times = [self.deadline or NEVER] + [self._deadline_of(w) for w in self.workers.values()]
        if self.phase in (BOOTING, RUNNING):
            times += self.not_before.values()
        if self.monitor:
            times.append(self.monitor.next_deadline())
        if self.phase == RUNNING and self.notifier.state == 'starting':
            times.append(self.running_since + self.settings.boot_timeout)
        soonest = min(times)
        return None if soonest == NEVER else max(0.0, soonest - time.monotonic())

    def url(self):
        return 'http://' + listening.format_address(self.settings.host or '0.0.0.0', self.port)

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
        # has already made select() return. Handled in order by _step.
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
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info('%s: stopping gracefully', name)
            self._begin_stop()
        elif signum == signal.SIGQUIT:
            log.info('SIGQUIT: stopping now')
            self._quit()
        elif signum == signal.SIGHUP:
            self._reload()
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            self._resize(1 if signum == signal.SIGTTIN else -1)
        elif signum == signal.SIGUSR1:
            log.info('SIGUSR1: reopening log files')
            logsetup.reopen()
            self._signal_workers(signal.SIGUSR1)
            if self.registrar and self.registrar.process.returncode is None:
                os.kill(self.registrar.pid, signal.SIGUSR1)

    def _reload(self):
        if self.phase not in (BOOTING, RUNNING):
            return
        try:
            new = self.reload_settings() if self.reload_settings else self.settings
        except ConfigError as error:
            log.error('SIGHUP: the configuration is not valid, keeping the running one: %s', error)
            return
        kept = [name for name in RESTART_ONLY if getattr(new, name) != getattr(self.settings, name)]
        if kept:
            log.warning('SIGHUP: %s changed, which takes a restart: keeping the running value(s)',
                        ', '.join(kept))
            new = dataclasses.replace(new, **{name: getattr(self.settings, name) for name in kept})
        if new.workers != self.settings.workers:
            self.worker_count = new.workers  # else TTIN/TTOU's count stands
        self.settings = new
        self.generation += 1
        self.reload_halted = False
        log.info('SIGHUP: reloading: replacing the workers one at a time (generation %d, %d worker(s))',
                 self.generation, self.worker_count)

    def _resize(self, change):
        if self.phase not in (BOOTING, RUNNING):
            return
        self.worker_count = max(1, self.worker_count + change)
        log.info('%s: now %d worker(s)', 'SIGTTIN' if change > 0 else 'SIGTTOU', self.worker_count)

    # -- workers ---------------------------------------------------------

    def _current(self):
        """Workers that are not retiring, by slot."""
        slots = collections.defaultdict(list)
        for worker in self.workers.values():
            if not worker.retiring:
                slots[worker.slot].append(worker)
        return slots

    def _stale(self, worker):
        outdated = worker.generation < self.generation and not self.reload_halted
        return outdated or worker.wants_replacement is not None

    def _converge(self):
        slots = self._current()
        replacing = any(not w.ready and any(self._stale(o) for o in slots[w.slot])
                        for here in slots.values() for w in here)
        for slot in range(self.worker_count):
            here = slots.get(slot, [])
            stale = [w for w in here if self._stale(w)]
            fresh = [w for w in here if not self._stale(w)]
            if not here:
                self._spawn_when_due(slot)
            elif stale and any(w.ready for w in fresh):
                for worker in stale:
                    self._retire(worker, worker.wants_replacement or 'reloaded: its replacement is ready')
            elif stale and not fresh and not replacing:
                replacing = self._spawn_when_due(slot)
        for slot, here in slots.items():
            if slot >= self.worker_count:
                for worker in here:
                    self._retire(worker, 'fewer workers wanted')

    def _spawn_when_due(self, slot):
        if self.not_before.get(slot, 0) > time.monotonic():
            return False
        self.not_before.pop(slot, None)
        self._spawn(slot)
        return True

    def _spawn(self, slot):
        master_end, worker_end = socket.socketpair()
        # Neither garbage collector writes to what the worker inherits, so
        # those pages (a preloaded application above all) stay shared; the
        # master makes little garbage and never unfreezes.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            master_end.close()
            self._forget_in_child()
            Worker(slot, self.settings, self.listener, worker_end, self.app).run()
        worker_end.close()
        master_end.setblocking(False)
        worker = WorkerProcess(slot, pid, master_end, self.generation)
        self.workers[pid] = worker
        self.selector.register(master_end, selectors.EVENT_READ, lambda: self._on_worker_message(worker))
        log.info('worker %d started (pid %d)', slot, pid)

    def _forget_in_child(self):
        """In a new worker: drop everything that is the master's alone, so that
        end of file on those pipes keeps meaning 'the master died'."""
        reset_signals(HANDLED_SIGNALS)
        fds = list(self._wakeup_fds) + [w.link.fileno() for w in self.workers.values()]
        if self.registrar:
            fds += self.registrar.child_fds()
        if self.monitor:
            fds += self.monitor.fds()
        systemd.forget_notify_socket()
        self.selector.close()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _retire(self, worker, reason):
        log.info('retiring worker %d (pid %d): %s', worker.slot, worker.pid, reason)
        worker.retiring = True
        worker.kill_at = time.monotonic() + self.settings.graceful_timeout + KILL_GRACE
        try:
            os.kill(worker.pid, signal.SIGTERM)
        except ProcessLookupError:
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
            if kind == 'hb':
                worker.requests = int(rest)
            elif kind == 'ready':
                worker.ready = True
                self.failures[worker.slot] = 0
                log.info('worker %d (pid %d) ready', worker.slot, worker.pid)
            elif kind == 'retire' and worker.wants_replacement is None:
                worker.wants_replacement = rest
                log.info('worker %d (pid %d) asks to be replaced: %s', worker.slot, worker.pid, rest)
            elif kind == 'boot-failed':
                worker.boot_error = rest

    def _deadline_of(self, worker):
        if worker.retiring:
            return worker.kill_at
        if not worker.ready:
            return min(worker.kill_at, worker.started + self.settings.boot_timeout)
        if self.settings.timeout:
            return min(worker.kill_at, worker.last_seen + self.settings.timeout)
        return worker.kill_at

    def _enforce_deadlines(self):
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if self._deadline_of(worker) > now:
                continue
            if worker.retiring:
                worker.kill('still running after graceful_timeout')
            elif not worker.ready:
                worker.boot_error = f'not ready within boot_timeout ({self.settings.boot_timeout:g} s)'
                worker.kill(worker.boot_error)
            else:
                worker.kill(f'sent no heartbeat for {now - worker.last_seen:.1f} s (timeout)')

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
        if self.phase not in (BOOTING, RUNNING) or worker.retiring:
            log.info('worker %d (pid %d) exited: %s', worker.slot, worker.pid, how)
        elif not worker.ready:
            self._boot_failed(worker, how)
        else:
            log.warning('worker %d (pid %d) exited unexpectedly: %s; replacing it',
                        worker.slot, worker.pid, how)

    def _boot_failed(self, worker, how):
        reason = worker.boot_error or how
        if self.phase == BOOTING and worker.generation == 0:
            log.error('worker %d (pid %d) failed to boot: %s', worker.slot, worker.pid, reason)
            self.exit_status = 1
            self._begin_stop()
            return
        if any(self._stale(other) for other in self._current()[worker.slot]):
            self.reload_halted = True
            log.error('reload halted: the new worker %d (pid %d) failed to boot: %s; '
                      'the old workers keep serving', worker.slot, worker.pid, reason)
        delay = self._back_off(worker.slot)
        log.error('worker %d (pid %d) failed to boot: %s; next try in %.1f s',
                  worker.slot, worker.pid, reason, delay)

    def _back_off(self, key):
        """Schedule the next start in a slot (or of the registrar) after one
        more failure in a row: 0.5 s doubling up to MAX_BACKOFF, so that
        something that dies at start never becomes a fork loop."""
        self.failures[key] += 1
        delay = min(MAX_BACKOFF, 0.5 * 2 ** (self.failures[key] - 1))
        self.not_before[key] = time.monotonic() + delay
        return delay

    def _signal_workers(self, signum):
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # -- registrar -------------------------------------------------------

    def _start_registrar(self):
        self.registrar_started = time.monotonic()
        self.registrar.start()
        self.selector.register(self.registrar.fileno(), selectors.EVENT_READ, self._on_registrar_events)

    def _on_registrar_events(self):
        events = self.registrar.events()
        if events is None:
            self._forget(self.registrar.fileno())
            return
        for event in events:
            kind = event.pop('event')
            if kind == 'unregistered':
                self.registration['nodes'] = []
                if self.phase == UNREGISTERING:
                    self._stop_workers(signal.SIGTERM)
            else:
                self.registration.update(event)

    def _registrar_exited(self, status):
        if not self.registrar.process.stdout.closed:
            self._on_registrar_events()
            self._forget(self.registrar.fileno())
        self.registrar.exited(status)
        if self.phase == UNREGISTERING:
            log.warning('the registrar (pid %d) exited while unregistering: %s; its session, '
                        'and the node with it, is closed', self.registrar.pid, describe_exit(status))
            self._stop_workers(signal.SIGTERM)
        if self.phase not in (BOOTING, RUNNING):
            return
        if time.monotonic() - self.registrar_started > REGISTRAR_STEADY:
            self.failures['registrar'] = 0
        delay = self._back_off('registrar')
        self.registration = {'state': 'restarting', 'nodes': []}  # its session is gone
        log.error('the registrar (pid %d) exited: %s; restarting it in %.1f s',
                  self.registrar.pid, describe_exit(status), delay)

    def _restart_registrar_when_due(self):
        due = self.not_before.get('registrar')
        if due is not None and due <= time.monotonic():
            del self.not_before['registrar']
            self._start_registrar()
            self._registered_data = None  # _update_registration registers again

    def _update_registration(self):
        """(Re-)register when what the node says has changed."""
        data = {'pid': os.getpid(), 'instance': self.instance,
                'workers': self.worker_count, 'generation': self.generation}
        if self.monitor:
            data['monitor'] = self.monitor_address()
        if data == self._registered_data:
            return
        self._registered_data = data
        endpoints = [(host, self.port) for host in listening.advertised_hosts(self.settings.host)]
        self.registrar.register(endpoints, data)

    # -- phases ----------------------------------------------------------

    def _step_booting(self):
        self._restart_registrar_when_due()
        self._converge()
        current = [w for here in self._current().values() for w in here]
        if len(current) >= self.worker_count and all(w.ready for w in current):
            self.phase = RUNNING
            self.running_since = time.monotonic()
            log.info('%d worker(s) ready, serving at %s', len(current), self.url())
            if not self.registrar:
                log.warning('no zookeeper option: serving unregistered')
            self._step_running()

    def _step_running(self):
        self._restart_registrar_when_due()
        self._converge()
        if self.registrar and self.registrar.process.returncode is None:
            self._update_registration()

    def _begin_stop(self):
        if self.phase not in (BOOTING, RUNNING):
            return
        if self.registrar and self.registrar.registered and self.registrar.process.returncode is None:
            self.phase = UNREGISTERING
            self.deadline = time.monotonic() + UNREGISTER_WAIT
            self.registrar.unregister()
        else:
            self._stop_workers(signal.SIGTERM)

    def _quit(self):
        if self.registrar:
            self.registrar.close()  # the session closes, the node goes with it
        self._stop_workers(signal.SIGQUIT, grace=KILL_GRACE)

    def _stop_workers(self, signum, grace=None):
        """Stop accepting (the master's copy of the socket goes too, so no
        connection waits in a backlog nobody serves) and let workers drain."""
        self.phase = DRAINING
        self.deadline = None
        kill_at = time.monotonic() + (grace or self.settings.graceful_timeout + KILL_GRACE)
        for worker in self.workers.values():
            worker.retiring = True
            worker.kill_at = min(worker.kill_at, kill_at)
        self._signal_workers(signum)
        self.listener.close()

    def _step_unregistering(self):
        if self.deadline is not None and time.monotonic() >= self.deadline:
            log.warning('ZooKeeper did not confirm the deregistration in time; stopping anyway')
            self._stop_workers(signal.SIGTERM)

    def _step_draining(self):
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

    # -- what the master tells: monitor and systemd ----------------------------

    def monitor_address(self):
        host, port = self.monitor.address()
        if host in ('0.0.0.0', '::'):
            host = listening.advertised_hosts(host)[0]
        return listening.format_address(host, port)

    def status(self):
        now = time.monotonic()
        return {
            'version': zkprefork.__version__,
            'pid': os.getpid(),
            'config_file': self.settings.config_file,
            'uptime': round(now - self.started_at, 3),
            'phase': self.phase,
            'listening': self.url(),
            'generation': self.generation,
            'workers_wanted': self.worker_count,
            'registration': self.registration,
            'workers': [self._worker_status(w, now) for w in
                        sorted(self.workers.values(), key=lambda w: (w.slot, w.started))],
        }

    def _worker_status(self, worker, now):
        try:
            rss = psutil.Process(worker.pid).memory_info().rss
        except psutil.Error:
            rss = None
        state = 'retiring' if worker.retiring else 'ready' if worker.ready else 'booting'
        return {'slot': worker.slot, 'pid': worker.pid, 'age': round(now - worker.started, 3),
                'requests': worker.requests, 'rss': rss, 'state': state,
                'generation': worker.generation}

    def _monitor_commands(self):
        def queue(signum):
            return lambda connection: (self.signals.append(signum),
                                       connection.write(f'{signal.Signals(signum).name} queued\n'))
        return {
            'help': (lambda c: self.monitor.help(c), 'the commands, one line each'),
            'status': (lambda c: c.write(json.dumps(self.status(), indent=1) + '\n'),
                       'the master and every worker, as JSON'),
            'workers': (self._workers_table, 'the workers, as a table'),
            'reload': (queue(signal.SIGHUP), 'rolling reload, as SIGHUP'),
            'ttin': (queue(signal.SIGTTIN), 'one worker more, as SIGTTIN'),
            'ttou': (queue(signal.SIGTTOU), 'one worker less, as SIGTTOU'),
        }

    def _workers_table(self, connection):
        connection.write(f'{"slot":>4} {"pid":>7} {"state":<8} {"gen":>3} {"age s":>9} '
                         f'{"requests":>9} {"rss MB":>7}\n')
        for w in self.status()['workers']:
            rss = f'{w["rss"] / 1048576:.1f}' if w['rss'] is not None else '-'
            connection.write(f'{w["slot"]:>4} {w["pid"]:>7} {w["state"]:<8} {w["generation"]:>3} '
                             f'{w["age"]:>9.1f} {w["requests"]:>9} {rss:>7}\n')

    def _systemd_state(self):
        if self.phase == BOOTING:
            return 'starting'
        if self.phase != RUNNING:
            return 'stopping'
        if any(self._stale(w) and w.generation < self.generation
               for here in self._current().values() for w in here):
            return 'reloading'
        settled = (not self.registrar or self.registration['nodes']
                   or time.monotonic() >= self.running_since + self.settings.boot_timeout)
        return 'ready' if settled or self.notifier.state != 'starting' else 'starting'

    def _status_line(self):
        ready = sum(w.ready and not w.retiring for w in self.workers.values())
        nodes = self.registration['nodes']
        registered = ('registered as ' + ', '.join(nodes) if nodes
                      else 'not registered' if self.registrar else 'no ZooKeeper')
        return f'{self.phase}: {ready} worker(s) serving {self.url()}; {registered}'
