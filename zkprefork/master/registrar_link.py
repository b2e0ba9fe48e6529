"""The master's end of the registrar process (see registrar.py): it starts,
watches, restarts (with back-off) and reports the registrar.

The master never imports kazoo: it starts the registrar as a fresh
interpreter and talks JSON lines to it over two pipes. Without a zookeeper
option the master gets a NoRegistrar, which has the same interface and
does nothing, so that the master never asks which one it has.
"""
import logging
import os
import selectors
import signal
import subprocess
import sys
import time

import zkprefork
from zkprefork.lines import LineReader
from zkprefork.master.credentials import HeldCredentials
from zkprefork.master.heartbeat import Heartbeat
from zkprefork.registrar.protocol import (
    STATES, HandOver, Own, RegistrarConfig, Register, Unregister, make_identity, read_event)
from zkprefork.supervision import MASTER_ONLY_SIGNALS, NEVER, Backoff, describe_exit

log = logging.getLogger('zkprefork.master')

REGISTRAR_STEADY = 60.0  # seconds a registrar runs before its exit is not "at start"
# While a registrar's session may be alive, its successor starts within
# this fraction of the session timeout, so that it resumes the session (and
# the node stays) however often registrars die.
RESUME_WITHIN = 0.25

# What the master wants of the registrar process: restart it when it exits
# (RUN), take its exit as the end of the node(s) (UNREGISTER), let it go (STOP),
# let it go with its session left open for a new master (HANDED, a live upgrade).
RUN, UNREGISTER, STOP, HANDED = 'run', 'unregister', 'stop', 'handed'

# The registration's states as the master reports them: the registrar's own,
# and three of the link's: no registrar wanted (OFF), one being restarted,
# one whose loop stopped answering (UNKNOWN: what it said may not hold).
OFF, RESTARTING, UNKNOWN = 'off', 'restarting', 'unknown'
REGISTRATION_STATES = (OFF, *STATES, RESTARTING, UNKNOWN)


def _ignore_group_signals():
    """In the child, before exec (ignored signals stay ignored through exec):
    from its first instruction on, the registrar survives a signal sent to
    the whole process group; USR1 stays ignored until it can reopen its logs."""
    for signum in MASTER_ONLY_SIGNALS + (signal.SIGUSR1,):
        signal.signal(signum, signal.SIG_IGN)


class SessionHandOver:
    """RegistrarLink's part in a live upgrade (master/upgrade.py): the
    session, and the nodes it holds, go from one master's registrar to the
    other's, never held by two at once."""

    on_spawn = None  # called with each new registrar's pid, before it learns the session

    def hold(self, selector):
        """New master, at start: no registrar until take_over()."""
        self._selector = selector
        self._wanted = HANDED

    def take_over(self, now, secrets=None):
        """New master: start the registrar, resuming the old master's
        session if `secrets` (from secrets()) name one."""
        if secrets:
            session = secrets['session']
            self._session = tuple(session) if session else None
            self._identity = secrets['identity']
            self._health_up = secrets['health_up']
            self._handed_over = session is not None
        self._wanted = RUN
        self._spawn(now)

    def hand_over(self):
        """Old master: the registrar exits leaving its session open; once it
        is reaped (`alive` false), `secrets()` is what the new master needs."""
        self._wanted = HANDED
        self._node_data = None
        self.backoff.cancel()
        self._send(HandOver().line())

    def secrets(self):
        """What resumes this link's session elsewhere: {'session': [id,
        password hex] or None, 'identity', 'health_up'}. Secrets: they
        travel only on an inherited socket, never argv, environment or logs."""
        return {'session': self._session, 'identity': self._identity, 'health_up': self._health_up}

    def take_back(self, now):
        """Old master, the upgrade failed: a new registrar resumes the
        session handed over (whoever else held it has exited)."""
        log.info('taking the ZooKeeper session back: starting a registrar')
        self._wanted = RUN
        self._spawn(now)

    def own(self):
        """New master, the old one retires: leaving closes the session again."""
        if self._handed_over:
            self._handed_over = False
            self._send(Own().line())


class Watchdog:
    """RegistrarLink's heartbeat (master/heartbeat.py): what the registrar
    last said (`_said`) is reported while its loop answers; a registrar
    whose loop stopped answering is killed, then restarted as a dead one."""

    @property
    def registration(self):
        """{'state', 'nodes', 'session', 'since', 'problems', 'error',
        'health'}: what the registrar last said, or, once its loop has been
        silent too long to vouch for it, UNKNOWN and no node."""
        now = time.monotonic()
        if self._watched() and self.heartbeat.stale(now):
            return self._unknown(now)
        return self._said

    @registration.setter
    def registration(self, value):
        self._said = value

    def _unknown(self, now):
        return {**self._said, 'state': UNKNOWN, 'nodes': [],
                'error': f'the registrar (pid {self.pid}) {self.heartbeat.silence(now)}'}

    def _watched(self):
        return self.alive and self._wanted in (RUN, UNREGISTER)

    def expire(self, now):
        """Ping the registrar when due; kill one silent past the bound
        (reap() then restarts it, resuming the session if it still lives)."""
        if not self._watched():
            return
        ping = self.heartbeat.ping(now)
        if ping:
            self._send(ping.line())
        elif self.heartbeat.dead(now):
            log.error('the registrar (pid %d) %s (session timeout %g s): killing it', self.pid,
                      self.heartbeat.silence(now), self.settings.session_timeout / 1000.0)
            self._said = self._unknown(now)
            self.heartbeat.stopped()
            self.signal(signal.SIGKILL)

    def _heartbeat_deadline(self, now):
        return self.heartbeat.deadline(now) if self._watched() else NEVER


class RegistrarLink(SessionHandOver, Watchdog):
    """The registrar, as the master sees it. Times are monotonic seconds."""

    def __init__(self, settings):
        self.settings = settings
        self.credentials = HeldCredentials(settings)
        self.heartbeat = Heartbeat(settings.session_timeout / 1000.0)
        self.process = None
        self.registration = {'state': STATES[0], 'nodes': []}  # what the registrar last said: connecting
        self.backoff = Backoff()
        self._wanted = RUN
        self._selector = None
        self._events = None
        self._started = None
        self._node_data = None  # what the last register command said
        self._confirmed = False  # the registrar said 'unregistered'
        # Secrets of this master's (see registrar_protocol), for every
        # registrar it starts: kept here, never in `registration`.
        self._identity = make_identity()  # used only without the user's credentials
        self._session = None  # (id, password hex) of the last registrar's session
        self._health_up = False  # the last registrar's health check said UP
        self._handed_over = False  # the session came from an upgrade's old master, not yet ours

    @property
    def pid(self):
        return self.process.pid if self.process else None

    @property
    def alive(self):
        return self.process is not None and self.process.returncode is None

    @property
    def registered(self):
        """A register command went to the running registrar and was not
        undone, or the registrar is being restarted while its session (which
        may hold the nodes) lives on. Not while the session is a live
        upgrade's, not yet owned: its nodes go back to the old master."""
        if self._handed_over:
            return False
        if self.alive:
            return self._node_data is not None
        return self._wanted == RUN and self._session is not None

    @property
    def unregistered(self):
        """The node(s) are gone: deleted, or closed with the registrar's session."""
        return self._confirmed or not self.alive

    def start(self, selector, now):
        self._selector = selector
        self._spawn(now)

    def _spawn(self, now):
        package_parent = os.path.dirname(os.path.dirname(zkprefork.__file__))
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [package_parent, env.get('PYTHONPATH')]))
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'zkprefork.registrar'],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            preexec_fn=_ignore_group_signals, pass_fds=self.credentials.fds())
        stdout = self.process.stdout
        os.set_blocking(stdout.fileno(), False)
        self._events = LineReader(lambda size: os.read(stdout.fileno(), size))
        self._selector.register(stdout, selectors.EVENT_READ, self._on_events)
        self._started = now
        self.heartbeat.started(now)
        self._node_data = None  # a new registrar registers again
        self._confirmed = False
        if self.on_spawn:
            self.on_spawn(self.process.pid)
        self._send(self._config().line())

    def _config(self):
        """The registrar's first line. Secrets travel as a file path (and
        its fd, master/credentials.py) or an environment variable's name:
        the registrar reads them itself."""
        return RegistrarConfig.from_settings(self.settings, self._identity, self._session,
                                             self._health_up, self._handed_over, self.credentials.fd)

    def reconfigure(self, settings):
        """A good reload's settings, for every registrar started from now on
        (the running one needs none of them: those it uses are restart-only)."""
        self.settings = settings
        self.credentials.hold(settings)

    def _send(self, line):
        try:
            self.process.stdin.write(line.encode())
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.error('the registrar (pid %d) is gone; it will be restarted', self.process.pid)

    # -- what the master asks --------------------------------------------

    def register(self, data, endpoints):
        """Have the node(s) say `data` (a dict) at `endpoints()` ((host, port)
        pairs), in the configured node format. Sent only when `data` changed
        or the registrar is new."""
        if not self.alive or data == self._node_data:
            return
        self._node_data = data
        self._send(Register(endpoints(), data).line())

    def unregister(self):
        """Ask for the node(s) to be deleted; `unregistered` tells when they
        are. A registrar being restarted is started at once (no back-off): it
        resumes the session, which may hold the nodes, to delete them; one
        that does not answer within heartbeat.STOP_KILL is replaced so."""
        self._node_data = None
        now = time.monotonic()
        if not self.alive and self._wanted == RUN:
            self._unregister_anew(now)
        else:
            self._send(Unregister().line())
        self._wanted = UNREGISTER
        self.heartbeat.hurry(now)

    def _unregister_anew(self, now):
        self.backoff.cancel()
        self._spawn(now)
        self._send(Unregister().line())

    def stand_down(self):
        """The master is stopping: no more restarts."""
        self._wanted = STOP
        self.backoff.cancel()

    def close(self):
        """End of file for the registrar: it closes the session and exits."""
        self._wanted = STOP
        self._close_stdin()

    def _close_stdin(self):
        if self.process and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass

    def kill(self):
        log.error('the registrar did not exit in time: killing it')
        self.signal(signal.SIGKILL)

    def signal(self, signum):
        if self.alive:
            os.kill(self.process.pid, signum)

    # -- watching and restarting -----------------------------------------

    def _on_events(self):
        if self.process.stdout.closed:
            return
        lines = self._events.lines()
        if lines is None:
            self._stop_watching()
            return
        for event in map(read_event, lines):
            kind = event.pop('event')
            if kind == 'unregistered':
                self._said['nodes'] = []
                self._confirmed = True
            elif kind == 'session':
                self._session = (event['id'], event['password'])
            elif kind == 'pong':
                self.heartbeat.answered(event['seq'], time.monotonic())
            else:
                self._said.update(event)
                self._health_up = (event['health'] or {}).get('state') == 'up'

    def _stop_watching(self):
        if not self.process.stdout.closed:
            self._selector.unregister(self.process.stdout)
            self.process.stdout.close()

    def reap(self, pid, status, now):
        """The master reaped `pid`: True if it was the registrar. While the
        master serves, a registrar that exited is restarted (`tend`) after
        its back-off."""
        if pid != self.pid:
            return False
        self._on_events()  # what it said last
        self._stop_watching()
        self.heartbeat.stopped()
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self._close_stdin()
        if self._wanted == HANDED:
            log.info('the registrar (pid %d) left its session to the new master: %s',
                     pid, describe_exit(status))
        elif self._wanted == UNREGISTER and not self._confirmed:
            # Killed, its session (and the node) lives on: the next one
            # resumes it and deletes the node (within the master's bound).
            log.warning('the registrar (pid %d) exited while unregistering: %s; starting another '
                        'to finish', pid, describe_exit(status))
            self._unregister_anew(now)
        elif self._wanted == RUN:
            if now - self._started > REGISTRAR_STEADY:
                self.backoff.reset()
            delay = self.backoff.failed(now, self._resume_limit())
            # Its session, and the nodes, live on until the next one resumes it.
            self.registration = {**self.registration, 'state': RESTARTING}
            log.error('the registrar (pid %d) exited: %s; restarting it in %.1f s',
                      pid, describe_exit(status), delay)
        return True

    def _resume_limit(self):
        """The longest restart back-off that lets the next registrar resume
        the session (seconds), or None without one to resume."""
        if self._session is None:
            return None
        return self.settings.session_timeout / 1000.0 * RESUME_WITHIN

    def tend(self, now):
        """Restart an exited registrar once its back-off is over."""
        if self._wanted == RUN and not self.alive and self.backoff.take(now):
            self._spawn(now)

    def next_deadline(self, now):
        return min(self.backoff.deadline(now), self._heartbeat_deadline(now))

    def child_fds(self):
        """The fds a forked worker must close so that only the master holds
        the registrar's pipes (its end of file must mean the master died),
        and the credentials file."""
        pipes = (self.process.stdin, self.process.stdout) if self.process else ()
        return [f.fileno() for f in pipes if not f.closed] + self.credentials.fds()

    # -- what the link tells ---------------------------------------------

    def settled(self):
        """Registered, as far as the master can tell."""
        return bool(self.registration['nodes'])

    def describe(self):
        nodes = self.registration['nodes']
        return 'registered as ' + ', '.join(nodes) if nodes else 'not registered'


class NoRegistrar:
    """The link without a zookeeper option: nothing to start, register or wait for."""

    pid = on_spawn = None
    alive = registered = False
    unregistered = True

    def __init__(self):
        self.registration = {'state': OFF, 'nodes': []}
        self._warned = False

    def register(self, data, endpoints):
        if not self._warned:
            self._warned = True
            log.warning('no zookeeper option: serving unregistered')

    def start(self, selector, now):
        pass

    def tend(self, now):
        pass

    def expire(self, now):
        pass

    def reconfigure(self, settings):
        pass

    def unregister(self):
        pass

    def stand_down(self):
        pass

    def close(self):
        pass

    def kill(self):
        pass

    def hold(self, selector):
        pass

    def take_over(self, now, secrets=None):
        pass

    def hand_over(self):
        pass

    def secrets(self):
        return {'session': None, 'identity': None, 'health_up': False}

    def take_back(self, now):
        pass

    def own(self):
        pass

    def signal(self, signum):
        pass

    def reap(self, pid, status, now):
        return False

    def next_deadline(self, now):
        return NEVER

    def child_fds(self):
        return []

    def settled(self):
        return True

    def describe(self):
        return 'no ZooKeeper'
