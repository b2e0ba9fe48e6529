"""The master: a single-threaded loop that keeps N workers serving the shared
socket, tells the registrar when to (un)register, and stops in order.

It sleeps in one place, `selector.select()`, woken by signals (through
signal.set_wakeup_fd), by worker messages and by registrar events; a timeout
is only ever the next deadline (a respawn back-off, a boot or heartbeat
limit, a stop step). It never imports kazoo and never calls the application;
zope.server is imported (spawn.py) but never run here.

Its rooms: the pool (pool.py) decides about workers and the master carries
out its actions (fork, signals); the link (registrar_link.py) supervises the
registrar; status.py and systemd.py tell the world. The master itself owns
the signals and the phases, each phase a step function in PHASES: a step
returns the phase to move to, and `_advance` is the one place that moves.
"""
import dataclasses
import logging
import os
import selectors
import signal
import time
import uuid

from zkprefork.master import listener as listening
from zkprefork import logsetup, proctitle
from zkprefork.addresses import bindable_host, format_address
from zkprefork.master import spawn, status, systemd
from zkprefork.master.monitor import NoMonitor
from zkprefork.master.pool import BootFailedAtStart, Kill, Pool, Retire, Spawn
from zkprefork.master.registrar_link import NoRegistrar
from zkprefork.worker.scoreboard import Scoreboards
from zkprefork.settings import RESTART_ONLY, ConfigError
from zkprefork.master.status import BOOTING, CLOSING, DONE, DRAINING, RUNNING, UNREGISTERING
from zkprefork.supervision import NEVER, describe_exit, reaped, send_signal
from zkprefork.worker.process import Worker

log = logging.getLogger('zkprefork.master')

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                   signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
UNREGISTER_WAIT = 5.0  # seconds the node deletion may take before workers stop anyway
REGISTRAR_EXIT_WAIT = 5.0


def keep_restart_only(running, new):
    """`new` Settings, except that options a reload cannot change keep their running value."""
    kept = [name for name in RESTART_ONLY if getattr(new, name) != getattr(running, name)]
    if kept:
        log.warning('SIGHUP: %s changed, which takes a restart: keeping the running value(s)',
                    ', '.join(kept))
    return dataclasses.replace(new, **{name: getattr(running, name) for name in kept})


def forget(selector, fileobj):
    try:
        selector.unregister(fileobj)
    except (KeyError, ValueError):
        pass  # already forgotten at end of file


class Master:
    """`signals` an installed SignalQueue of HANDLED_SIGNALS, `link` a
    RegistrarLink or NoRegistrar, `monitor` a Monitor or NoMonitor."""

    def __init__(self, settings, listener, signals, app=None, link=None, reload_settings=None,
                 monitor=None):
        self.settings = settings
        self.listener = listener
        self.port = listening.bound_port(listener)
        self.app = app  # a preloaded application, or None: workers load it
        self.link = link or NoRegistrar()
        self.monitor = monitor or NoMonitor()
        self.reload_settings = reload_settings  # () -> Settings, re-reading the config
        self.pool = Pool(settings)
        self.scoreboards = Scoreboards(settings.workers, settings.threads)  # before any fork
        self.phase = BOOTING
        self.exit_status = 0
        self.stop_signal = None  # SIGTERM (drain) or SIGQUIT (now), once a stop is asked
        self.drain_signal = None  # what the workers were told to stop with
        self.deadline = None  # when the current stop phase gives up waiting
        self.signals = signals
        self.selector = selectors.DefaultSelector()
        self.instance = uuid.uuid4().hex  # tells this master's nodes from any other's
        self.started_at = time.monotonic()
        self.running_since = None
        self.notifier = systemd.Notifier()
        self.view = status.MasterView(self)
        self.certificate = status.certificate_of(settings)

    # -- the loop --------------------------------------------------------

    def run(self):
        proctitle.set(f'master {self.settings.config_file or ""} '
                      f'{format_address(bindable_host(self.settings.host), self.port)}')
        self.signals.watch(self.selector)
        self.monitor.start(self.selector, status.monitor_commands(self.view, self.signals.append),
                           lambda: status.status(self.view))
        self.link.start(self.selector, time.monotonic())
        spawn.import_serving_stack()
        log.info('master (pid %d) listening at %s, starting %d worker(s) of %d thread(s)',
                 os.getpid(), self.url(), self.pool.count, self.settings.threads)
        try:
            while True:
                self._step()
                if self.phase == DONE:
                    break
                for key, _ in self.selector.select(self._timeout()):
                    key.data()
        finally:
            self.monitor.close()
        log.info('master (pid %d) exiting with status %d', os.getpid(), self.exit_status)
        return self.exit_status

    def _step(self):
        """All the loop does after waking, in an order that is safe to repeat:
        handle signals, reap children, enforce deadlines, advance the phase."""
        for signum in self.signals.pending():
            self._on_signal(signum)
        now = time.monotonic()
        self._reap(now)
        self._perform(self.pool.expired(now))
        self.monitor.expire(now)
        self._advance(now)
        self.notifier.update(status.systemd_state(self.view, now), status.status_line(self.view))

    def _timeout(self):
        now = time.monotonic()
        soonest = min(self.deadline or NEVER, self.pool.next_deadline(now), self.link.next_deadline(now),
                      self.monitor.next_deadline(), status.systemd_ready_by(self.view))
        return None if soonest == NEVER else max(0.0, soonest - now)

    def url(self):
        return f'{self.settings.scheme}://' + format_address(bindable_host(self.settings.host), self.port)

    # -- signals ---------------------------------------------------------

    def _on_signal(self, signum):
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info('%s: stopping gracefully', name)
            self.stop_signal = self.stop_signal or signal.SIGTERM
        elif signum == signal.SIGQUIT:
            log.info('SIGQUIT: stopping now')
            self.stop_signal = signal.SIGQUIT
        elif signum == signal.SIGHUP:
            self._reload()
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            self._resize(1 if signum == signal.SIGTTIN else -1)
        elif signum == signal.SIGUSR1:
            log.info('SIGUSR1: reopening log files')
            logsetup.reopen()
            for pid in self.pool.workers:
                send_signal(pid, signal.SIGUSR1)
            self.link.signal(signal.SIGUSR1)

    def _serving(self):
        """Reloads and resizing only count before a stop was asked."""
        return self.phase in (BOOTING, RUNNING) and self.stop_signal is None

    def _reload(self):
        if not self._serving():
            return
        try:
            new = self.reload_settings() if self.reload_settings else self.settings
        except ConfigError as error:
            log.error('SIGHUP: the configuration is not valid, keeping the running one: %s', error)
            return
        self.settings = keep_restart_only(self.settings, new)
        self.certificate = status.certificate_of(self.settings)
        self.pool.reload(self.settings)
        log.info('SIGHUP: reloading: replacing the workers one at a time (generation %d, %d worker(s))',
                 self.pool.generation, self.pool.count)

    def _resize(self, change):
        if self._serving():
            count = self.pool.resize(change)
            log.info('%s: now %d worker(s)', 'SIGTTIN' if change > 0 else 'SIGTTOU', count)

    # -- carrying out the pool's actions ---------------------------------

    def _perform(self, actions):
        for action in actions:
            match action:
                case Spawn(slot):
                    self._spawn(slot)
                case Retire(pid):
                    send_signal(pid, signal.SIGTERM)
                case Kill(pid):
                    send_signal(pid, signal.SIGKILL)
                case BootFailedAtStart():
                    self.exit_status = 1
                    self.stop_signal = self.stop_signal or signal.SIGTERM

    def _spawn(self, slot):
        record = self.scoreboards.claim(self.pool.count, self.settings.threads)

        def serve(link):
            # Old boards still in use by draining workers would otherwise
            # stay mapped in this worker for its whole life.
            self.scoreboards.keep_only(record.board)
            Worker(slot, self.settings, self.listener, link, record, self.app).run()
        masters_fds = (self.signals.fds() + [w.link.fileno() for w in self.pool.workers.values()]
                       + self.link.child_fds() + self.monitor.fds())
        pid, link = spawn.fork_worker(serve, self.selector, masters_fds, HANDLED_SIGNALS)
        self.pool.started(slot, pid, time.monotonic(), link).record = record
        self.selector.register(link.sock, selectors.EVENT_READ, lambda: self._on_worker_link(pid, link))

    def _on_worker_link(self, pid, link):
        messages = link.messages()
        if messages is None:
            forget(self.selector, link.sock)
        else:
            self.pool.heard(pid, messages, time.monotonic())

    def _reap(self, now):
        for pid, wait_status in reaped():
            worker = self.pool.workers.get(pid)
            if worker is None:
                self.link.reap(pid, wait_status, now)
                continue
            self._on_worker_link(pid, worker.link)  # what it said last
            forget(self.selector, worker.link.sock)
            worker.link.close()
            self.scoreboards.release(worker.record)
            self._perform(self.pool.exited(pid, describe_exit(wait_status), now))

    # -- phases: each step returns the phase to move to, or None to stay --

    def _advance(self, now):
        """Run the phase's step until the phase stays; the only place that
        changes phase (then runs what entering the new one does)."""
        while self.phase != DONE:
            step, _ = PHASES[self.phase]
            following = step(self, now)
            if following is None:
                return
            self.phase = following
            enter = PHASES[following][1]
            if enter:
                enter(self, now)

    def _stop_phase(self):
        registered = self.stop_signal == signal.SIGTERM and self.link.registered
        return UNREGISTERING if registered else DRAINING

    def _tend(self, now):
        self.link.tend(now)
        self._perform(self.pool.converge(now))

    def _step_booting(self, now):
        if self.stop_signal:
            return self._stop_phase()
        self._tend(now)
        return RUNNING if self.pool.all_ready() else None

    def _enter_running(self, now):
        self.running_since = now
        self.pool.booting = False
        log.info('%d worker(s) ready, serving at %s', self.pool.serving(), self.url())

    def _step_running(self, now):
        if self.stop_signal:
            return self._stop_phase()
        self._tend(now)
        self.link.register(status.node_data(self.view), lambda: status.endpoints(self.view))

    def _enter_unregistering(self, now):
        self.pool.stopping = True
        self.deadline = now + UNREGISTER_WAIT
        self.link.unregister()

    def _step_unregistering(self, now):
        if self.stop_signal == signal.SIGQUIT or self.link.unregistered:
            return DRAINING
        if now >= self.deadline:
            log.warning('ZooKeeper did not confirm the deregistration in time; stopping anyway')
            return DRAINING

    def _enter_draining(self, now):
        """Stop accepting (the master's copy of the socket goes too, so no
        connection waits in a backlog nobody serves) and let workers drain;
        SIGQUIT drains only for KILL_GRACE."""
        quit_now = self.stop_signal == signal.SIGQUIT
        if quit_now:
            self.link.close()  # the session closes, the node goes with it
        self.link.stand_down()
        self.scoreboards.stopping()
        self.drain_signal = self.stop_signal
        self.deadline = None
        for pid in self.pool.retire_all(now, graceful=not quit_now):
            send_signal(pid, self.stop_signal)
        self.listener.close()

    def _step_draining(self, now):
        if self.stop_signal != self.drain_signal:
            return DRAINING  # SIGQUIT while draining: again, now quickly
        if self.pool.workers:
            return None
        return CLOSING if self.link.alive else DONE

    def _enter_closing(self, now):
        """After a graceful stop, the registrar may wait for an unreachable
        ZooKeeper up to a session timeout, to close the session (the node
        goes with it) as soon as ZooKeeper answers: ZooKeeper would keep it
        that long. The port is closed already; nothing is served."""
        wait = REGISTRAR_EXIT_WAIT
        if self.stop_signal == signal.SIGTERM:
            wait += self.settings.session_timeout / 1000.0
        self.deadline = now + wait
        self.link.close()

    def _step_closing(self, now):
        if not self.link.alive:
            return DONE
        if self.deadline is not None and now >= self.deadline:
            self.link.kill()
            self.deadline = None


# phase -> (its step, what entering it does)
PHASES = {
    BOOTING: (Master._step_booting, None),
    RUNNING: (Master._step_running, Master._enter_running),
    UNREGISTERING: (Master._step_unregistering, Master._enter_unregistering),
    DRAINING: (Master._step_draining, Master._enter_draining),
    CLOSING: (Master._step_closing, Master._enter_closing),
    DONE: (None, None),
}
