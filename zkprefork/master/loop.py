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
from zkprefork import logsetup, proctitle, tls
from zkprefork.addresses import bindable_host, format_address
from zkprefork.master import spawn, status, systemd, upgrade
from zkprefork.master.hands import Hands
from zkprefork.master.monitor import NoMonitor
from zkprefork.master.pool import Pool
from zkprefork.master.registrar_link import NoRegistrar
from zkprefork.master.signalqueue import HANDLED_SIGNALS, STOP_SIGNALS
from zkprefork.worker.scoreboard import Scoreboards
from zkprefork.settings import RESTART_ONLY, ConfigError
from zkprefork.master.status import BOOTING, CLOSING, DONE, DRAINING, RUNNING, UNREGISTERING
from zkprefork.supervision import NEVER, send_signal

log = logging.getLogger('zkprefork.master')

UNREGISTER_WAIT = 5.0  # seconds the node deletion may take before workers stop anyway
REGISTRAR_EXIT_WAIT = 5.0


def keep_restart_only(running, new):
    """`new` Settings, except that options a reload cannot change keep their running value."""
    kept = [name for name in RESTART_ONLY if getattr(new, name) != getattr(running, name)]
    if kept:
        log.warning('SIGHUP: %s changed, which takes a restart: keeping the running value(s)',
                    ', '.join(kept))
    return dataclasses.replace(new, **{name: getattr(running, name) for name in kept})


def serving_context(settings):
    """The SSLContext the workers forked from now serve with, None without
    TLS (tls.server_context: ConfigError for files that no longer load).
    Made in the master so that they all share its session ticket keys."""
    return tls.server_context(settings) if settings.tls else None


class Master:
    """`signals` an installed SignalQueue of HANDLED_SIGNALS, `link` a
    RegistrarLink or NoRegistrar, `monitor` a Monitor or NoMonitor,
    `inherited` an upgrade.Inherited when an old master started this one."""

    def __init__(self, settings, listener, signals, app=None, link=None, reload_settings=None,
                 monitor=None, inherited=None):
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
        self.retiring = False  # a new master took over: workers retire as on a reload
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
        self.tls_context = serving_context(settings)
        self.upgrades = upgrade.Upgrades(self, inherited)
        self.hands = Hands(self, HANDLED_SIGNALS)

    # -- the loop --------------------------------------------------------

    def run(self):
        self._title()
        self.signals.watch(self.selector)
        self.monitor.start(self.selector, status.monitor_commands(self.view, self.signals.append),
                           lambda: status.status(self.view))
        self.upgrades.start_link(time.monotonic())
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
        self.hands.reap(now)
        self.hands.perform(self.pool.expired(now))
        self.monitor.expire(now)
        self.link.expire(now)
        self.upgrades.step(now)
        self._advance(now)
        if not self.upgrades.taking_over:
            self.notifier.update(status.systemd_state(self.view, now), status.status_line(self.view))
        self._title()

    def _title(self):
        state = self.upgrades.state
        proctitle.set(f'master {self.settings.config_file or ""} '
                      f'{format_address(bindable_host(self.settings.host), self.port)}'
                      + (f' [{state}]' if state else ''))

    def _timeout(self):
        now = time.monotonic()
        soonest = min(self.deadline or NEVER, self.pool.next_deadline(now), self.link.next_deadline(now),
                      self.monitor.next_deadline(), status.systemd_ready_by(self.view),
                      self.upgrades.next_deadline())
        return None if soonest == NEVER else max(0.0, soonest - now)

    def url(self):
        return f'{self.settings.scheme}://' + format_address(bindable_host(self.settings.host), self.port)

    # -- signals ---------------------------------------------------------

    def _on_signal(self, signum):
        name = signal.Signals(signum).name
        if signum in STOP_SIGNALS and self.upgrades.hold_stop(signum):
            log.info('%s: stopping the new master first; then this one', name)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            log.info('%s: stopping gracefully', name)
            self.stop_signal = self.stop_signal or signal.SIGTERM
        elif signum == signal.SIGQUIT:
            log.info('SIGQUIT: stopping now')
            self.stop_signal = signal.SIGQUIT
        elif signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU) and self.upgrades.ignored(name):
            pass
        elif signum == signal.SIGHUP:
            self._reload()
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            self._resize(1 if signum == signal.SIGTTIN else -1)
        elif signum == signal.SIGUSR2:
            self.upgrades.upgrade(time.monotonic())
        elif signum == signal.SIGUSR1:
            log.info('SIGUSR1: reopening log files')
            logsetup.reopen()
            for pid in self.pool.workers:
                send_signal(pid, signal.SIGUSR1)
            self.link.signal(signal.SIGUSR1)

    def serving(self):
        """Reloads, resizing and upgrades only count before a stop was asked."""
        return self.phase in (BOOTING, RUNNING) and self.stop_signal is None

    def retire(self):
        """A new master has taken over: stop as on SIGTERM, except that the
        workers retire as on a reload (idle keep-alive connections stay
        for a keep-alive timeout, their next request answered)."""
        self.retiring = True
        self.stop_signal = self.stop_signal or signal.SIGTERM

    def _reload(self):
        if not self.serving():
            return
        try:
            new = self.reload_settings() if self.reload_settings else self.settings
            new = keep_restart_only(self.settings, new)
            context = serving_context(new)  # the files as they are now, for the new workers
        except ConfigError as error:
            log.error('SIGHUP: the configuration is not valid, keeping the running one: %s', error)
            return
        self.settings, self.tls_context = new, context
        self.link.reconfigure(self.settings)
        self.certificate = status.certificate_of(self.settings)
        self.pool.reload(self.settings)
        log.info('SIGHUP: reloading: replacing the workers one at a time (generation %d, %d worker(s))',
                 self.pool.generation, self.pool.count)

    def _resize(self, change):
        if self.serving():
            count = self.pool.resize(change)
            log.info('%s: now %d worker(s)', 'SIGTTIN' if change > 0 else 'SIGTTOU', count)

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
        self.hands.perform(self.pool.converge(now))

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
        if not self.retiring:
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
        """After any stop, the registrar may wait for an unreachable
        ZooKeeper up to a session timeout, to close the session (the node
        goes with it) as soon as ZooKeeper answers: ZooKeeper would keep it
        that long. The port is closed already; nothing is served."""
        self.deadline = now + REGISTRAR_EXIT_WAIT + self.settings.session_timeout / 1000.0
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
