"""Live upgrade: SIGUSR2 (or the monitor's `upgrade`) starts a new master,
which takes over the socket and the registration; the old one retires.

The old master starts the installed zkprefork again with the command line
it was started with (a fresh interpreter: the program and code on disk
now, the config read anew), as its child, handing it inherited fds named
by environment variables: the listening socket (ZKPREFORK_FD), the
monitor's (ZKPREFORK_MONITOR_FD, if any) and one end of a socketpair, the
channel (ZKPREFORK_UPGRADE_FD), on which both speak JSON lines::

    old master                  new master                  ZooKeeper
    | USR2: pidfile -> .oldbin, monitor paused, spawn ---->|
    | (serves on)               | config, workers boot     |
    |<------------------------- ready {key}                |
    | same key: registrar <- hand_over; it exits, the      |
    |   session left open (node untouched)                 |
    | session {id, password, identity, instance} --------->|
    |                           | registrar resumes it ----> same node, data updated
    |                           |   (told its pid first)    |
    |<------------------------- registered                 |
    | MAINPID=new; workers retire as on a reload; exit 0   |
    |                           | channel EOF: registrar <- own

The session moves only while no registrar holds it: the old one has
exited (reaped) before the session is sent, and the new master's
registrar, started `handed_over`, leaves it open on every way out until
`own`, so that an old master whose new one failed takes it back (a
registrar of its own resuming it) once that registrar has exited too (a
pidfd says when). With another key (zookeeper, path, host, port or
node_format changed), make before break: no session is sent; the old
master deletes its node(s) only after the new one said `registered`.

Anything that ends the attempt before `registered` (the new master exits:
status 2 for a bad config, 1 for a boot failure; or takes longer than
UPGRADE_TIMEOUT_FACTOR x boot_timeout, and is killed) is one log line;
the old master serves on with its node and can be upgraded again.
"""
import json
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time

from zkprefork.lines import LineReader
from zkprefork.master import pidfile, signalqueue, systemd
from zkprefork.supervision import NEVER, describe_exit, send_signal

log = logging.getLogger('zkprefork.master')

ENV_LISTEN_FD = 'ZKPREFORK_FD'
ENV_MONITOR_FD = 'ZKPREFORK_MONITOR_FD'
ENV_CHANNEL_FD = 'ZKPREFORK_UPGRADE_FD'
# The new master must have said `registered` within this many boot_timeouts.
UPGRADE_TIMEOUT_FACTOR = 2
REGISTRAR_EXIT_WAIT = 5.0  # seconds a failed new master's registrar may take to exit

# The states status and metrics show ('' when no upgrade runs; the metric's
# label says 'none' then). Old master:
STARTING, HANDING, WAITING, RETIRING, TAKING_BACK = (
    'starting new master', 'handing over', 'new master registering', 'retiring', 'taking back')
# New master:
TAKEOVER_BOOTING, TAKEOVER_AWAITING, TAKEOVER_REGISTERING, TAKEOVER_FAILED, TAKEOVER_TAKEN = (
    'taking over: booting', 'taking over: awaiting session', 'taking over: registering',
    'taking over: failed', 'taken over')
STATES = ('', STARTING, HANDING, WAITING, RETIRING, TAKING_BACK,
          TAKEOVER_BOOTING, TAKEOVER_AWAITING, TAKEOVER_REGISTERING, TAKEOVER_FAILED, TAKEOVER_TAKEN)


def registration_key(settings, port):
    """What a node's identity depends on: with equal keys, the old master's
    session (and so its nodes) moves to the new master as it is."""
    return [settings.zookeeper, settings.path, settings.host, port, settings.node_format]


class Channel:
    """JSON lines between the two masters on a Unix stream socket."""

    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)
        self._reader = LineReader(sock.recv)

    def send(self, **message):
        # A few hundred bytes on an empty socket buffer: never blocks.
        try:
            self.sock.sendall(json.dumps(message).encode() + b'\n')
        except OSError:
            pass  # the other master is gone; its exit (or EOF) says so

    def messages(self):
        """The messages (dicts) read now; None at end of file."""
        lines = self._reader.lines()
        return None if lines is None else [json.loads(line) for line in lines]

    def close(self, selector):
        try:
            selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class Inherited:
    """In a new master: the fds its old master handed it."""

    def __init__(self, listener, monitor, channel):
        self.listener = listener  # the listening socket
        self.monitor = monitor  # the monitor's listening socket, or None
        self.channel = channel

    @classmethod
    def from_environment(cls):
        """The handed fds, or None when not started by an upgrade. The
        variables are removed, so that no child takes them for its own."""
        fds = [os.environ.pop(name, None) for name in (ENV_LISTEN_FD, ENV_MONITOR_FD, ENV_CHANNEL_FD)]
        if fds[0] is None or fds[2] is None:
            return None
        listener, monitor, channel = (fd and socket.socket(fileno=int(fd)) for fd in fds)
        listener.setblocking(False)
        return cls(listener, monitor or None, channel)

    def monitor_for(self, address):
        """The inherited monitor socket if `address` ((host, port) or None)
        is where it listens, else None (and it is closed)."""
        sock, self.monitor = self.monitor, None
        if sock is not None and address and address[1] == sock.getsockname()[1]:
            sock.setblocking(False)
            return sock
        if sock is not None:
            sock.close()
        return None


class Upgrades:
    """A master's upgrades, one at a time: as the old master (`attempt`),
    and, in a master an upgrade started, as the new one (`takeover`).

    HUP, TTIN and TTOU while either runs are logged and ignored (the pool
    they would change is about to retire, or not yet in charge); a stop
    signal is passed to the new master, and the old one stops once that
    has exited and it has its session back."""

    def __init__(self, master, inherited=None):
        self.master = master
        self.attempt = None
        self.takeover = inherited and Takeover(master, inherited)
        self.held_stop = None  # a stop signal that waits for the attempt's end

    @property
    def busy(self):
        return bool(self.attempt or (self.takeover and not self.takeover.done))

    @property
    def taking_over(self):
        """A new master whose old one has not exited: systemd (NotifyAccess=main)
        hears only the old master until that has sent MAINPID= and gone."""
        return bool(self.takeover and not self.takeover.done)

    @property
    def state(self):
        part = self._current()
        return part.state if part else ''

    def _current(self):
        """The attempt, or the takeover until the old master is gone; or None."""
        return self.attempt or (self.takeover if self.busy else None)

    def start_link(self, now):
        """Start the registrar, unless it must wait for the old master's session."""
        if self.takeover:
            self.takeover.begin(now)
        else:
            self.master.link.start(self.master.selector, now)

    def upgrade(self, now):
        if self.busy:
            log.warning('SIGUSR2: an upgrade is already running (%s): ignored', self.state)
        elif self.master.serving():
            self.attempt = Attempt(self.master, now)
        else:
            log.warning('SIGUSR2: stopping: no upgrade')

    def ignored(self, name):
        """True (and logged) if the signal `name` waits for no upgrade."""
        if self.busy:
            log.warning('%s: ignored during an upgrade (%s); send it to the master that serves after',
                        name, self.state)
        return self.busy

    def hold_stop(self, signum):
        """True if the master's own stop waits for the attempt's end: the
        signal is passed to its new master (if that has not exited: its pid
        may be another process's once reaped). A retiring master stops as
        asked; the new one, in charge, is left alone."""
        attempt = self.attempt
        if attempt is None or attempt.state == RETIRING:
            return False
        if not attempt.exited:
            send_signal(attempt.process.pid, signum)
        self.held_stop = signum
        return True

    def step(self, now):
        if self.attempt and self.attempt.step(now):
            self.attempt = None
            if self.held_stop:
                self.master.signals.append(self.held_stop)
        if self.takeover:
            self.takeover.step(now)

    def reap(self, pid, wait_status):
        return bool(self.attempt) and self.attempt.reap(pid, wait_status)

    def next_deadline(self):
        return self.attempt.deadline if self.attempt else NEVER

    def fds(self):
        """What a forked worker closes."""
        parts = [p for p in (self.attempt, self.takeover) if p and not getattr(p, 'done', False)]
        return [fd for part in parts for fd in part.fds()]

    def status(self):
        """None, or {'state', 'old' or 'new': the other master's pid, 'for': seconds}."""
        part = self._current()
        if part is None:
            return None
        other = 'new' if part is self.attempt else 'old'
        return {'state': part.state, other: part.peer, 'for': round(time.monotonic() - part.since, 3)}


class Attempt:
    """The old master's side of one upgrade: from spawning the new master
    to retiring (`state` RETIRING) or to having its session back."""

    def __init__(self, master, now):
        self.master = master
        self.since = now
        self.deadline = now + UPGRADE_TIMEOUT_FACTOR * master.settings.boot_timeout
        self.state = STARTING
        self.failure = None  # why the attempt failed, once it has
        self.exited = False
        self.new_registrar = None  # pidfd of the new master's registrar, while it may hold the session
        self.handing = False  # our registrar was told to hand its session over
        ours, theirs = socket.socketpair()
        self.channel = Channel(ours)
        self.process = self._spawn(theirs)
        self.peer = self.process.pid
        theirs.close()
        master.selector.register(ours, selectors.EVENT_READ, self._on_channel)
        log.info('SIGUSR2: upgrading: started a new master (pid %d); serving on until it has taken over',
                 self.peer)

    def _spawn(self, channel_end):
        settings, master = self.master.settings, self.master
        fds = {ENV_LISTEN_FD: master.listener.fileno(), ENV_CHANNEL_FD: channel_end.fileno()}
        monitor_fd = master.monitor.pause()
        if monitor_fd is not None:
            fds[ENV_MONITOR_FD] = monitor_fd
        if settings.pidfile:
            pidfile.set_aside(settings.pidfile)
        env = dict(os.environ, **{name: str(fd) for name, fd in fds.items()})
        # The interpreter and its options, then what it ran (the console
        # script, -m zkprefork.cli, pserve...) with its arguments.
        with signalqueue.held():  # the new master's signals wait for its queue from its first instruction
            return subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env, pass_fds=list(fds.values()))

    def fds(self):
        return [self.channel.sock.fileno()] + ([self.new_registrar] if self.new_registrar else [])

    def _on_channel(self):
        messages = self.channel.messages()
        if messages is None:
            self.channel.close(self.master.selector)
            return
        for message in messages:
            self._on_message(message)

    def _on_message(self, message):
        op = message.get('op')
        if op == 'ready':
            if self.state == STARTING:
                self._on_ready(message['key'])
        elif op == 'registrar':
            self._watch_registrar(message['pid'])
        elif op == 'registered':
            if self.failure is None:
                self._retire()
        elif op == 'failed':
            if self.failure is None:
                self._fail(f'the new master (pid {self.peer}) {message["reason"]}')
        else:
            log.error('upgrade: unknown message from the new master: %r', message)

    def _on_ready(self, key):
        if key == registration_key(self.master.settings, self.master.port):
            self.state = HANDING
            self.handing = True
            self.master.link.hand_over()
        else:
            log.info('upgrade: the registration changed: the new master registers first, '
                     'then this one unregisters')
            self.channel.send(op='session', secrets=None, instance=None)
            self.state = WAITING

    def _watch_registrar(self, pid):
        """A pidfd, readable once `pid` exits: it wakes the loop then."""
        log.info("upgrade: the new master's registrar is pid %d", pid)
        self._forget_registrar()  # an earlier one, exited already
        try:
            self.new_registrar = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        self.master.selector.register(self.new_registrar, selectors.EVENT_READ, lambda: None)

    def _forget_registrar(self):
        if self.new_registrar is not None:
            self.master.selector.unregister(self.new_registrar)
            os.close(self.new_registrar)
            self.new_registrar = None

    def _retire(self):
        self.state = RETIRING
        log.info('upgrade: the new master (pid %d) has taken over: retiring', self.peer)
        systemd.notify(f'MAINPID={self.peer}')
        systemd.forget_notify_socket()  # the new master speaks to systemd now
        self.deadline = NEVER
        self.master.retire()

    def step(self, now):
        """Move on; True once the attempt is over (failed and undone)."""
        if self.state == HANDING and not self.master.link.alive:
            secrets = self.master.link.secrets()
            self.channel.send(op='session', secrets=secrets, instance=self.master.instance)
            self.state = WAITING
        if self.state != RETIRING and self.failure is None and now >= self.deadline:
            self._fail(f'the new master (pid {self.peer}) had not taken over within '
                       f'{UPGRADE_TIMEOUT_FACTOR} x boot_timeout: killing it')
            send_signal(self.peer, signal.SIGKILL)
        if self.failure is None or not self.exited:
            return False
        return self._take_back(now)

    def reap(self, pid, wait_status):
        if pid != self.peer:
            return False
        self.exited = True
        self.process.returncode = os.waitstatus_to_exitcode(wait_status)
        if self.failure is None and self.state != RETIRING:
            self._fail(f'the new master (pid {pid}) exited before taking over: '
                       f'{describe_exit(wait_status)}{_hint(self.process.returncode)}')
        return True

    def _fail(self, reason):
        self.failure = reason
        self.state = TAKING_BACK
        self.deadline = time.monotonic() + REGISTRAR_EXIT_WAIT
        if self.master.upgrades.held_stop:  # the stop went on to the new master: no failure
            log.info('upgrade ended by the stop: %s', reason)
        else:
            log.error('upgrade failed: %s; this master (pid %d) serves on', reason, os.getpid())

    def _take_back(self, now):
        """Once neither registrar may hold the session: ours resumes it."""
        if self.channel.sock.fileno() != -1:
            # The new master's last words, unread when its exit was reaped,
            # may name a registrar of its that still holds the session.
            self._on_channel()
        if self.master.link.alive and self.handing:
            return False  # ours is still handing over: its exit comes first
        if self.new_registrar is not None and not self._registrar_exited(now):
            return False
        if self.handing:
            self.master.link.take_back(now)
        self.deadline = NEVER
        self.channel.close(self.master.selector)
        self.master.monitor.resume()
        if self.master.settings.pidfile:
            pidfile.restore(self.master.settings.pidfile)
        return True

    def _registrar_exited(self, now):
        if select.select([self.new_registrar], [], [], 0)[0]:
            self._forget_registrar()
            return True
        if now >= self.deadline:
            log.error("upgrade: the new master's registrar has not exited: killing it")
            signal.pidfd_send_signal(self.new_registrar, signal.SIGKILL)
            self.deadline = NEVER  # its exit wakes the loop
        return False


def _hint(code):
    return {2: ' (its configuration is not valid: see its error above)',
            1: ' (its workers or application failed to start: see above)',
            0: ' (it was stopped)'}.get(code, '')


class Takeover:
    """The new master's side: `ready` once its workers are, then the old
    master's session, then `registered` once ZooKeeper confirmed its nodes."""

    def __init__(self, master, inherited):
        self.master = master
        self.channel = Channel(inherited.channel)
        self.peer = os.getppid()  # the old master started us
        self.since = time.monotonic()
        self.state = TAKEOVER_BOOTING
        self.done = False  # the old master is gone (end of file on the channel)

    def begin(self, now):
        self.master.selector.register(self.channel.sock, selectors.EVENT_READ, self._on_channel)
        self.master.link.hold(self.master.selector)
        self.master.link.on_spawn = lambda pid: self.channel.send(op='registrar', pid=pid)
        log.info('taking over from the old master (pid %d)', self.peer)

    def fds(self):
        return [self.channel.sock.fileno()]

    def step(self, now):
        master = self.master
        if self.state == TAKEOVER_BOOTING and master.serving() and master.pool.all_ready():
            self.state = TAKEOVER_AWAITING
            self.channel.send(op='ready', key=registration_key(master.settings, master.port))
        if self.state != TAKEOVER_REGISTERING:
            return
        if not master.serving():  # stopped while its registrar resumes the session: no takeover
            self.state = TAKEOVER_FAILED
            self.channel.send(op='failed', reason='was stopped while taking over')
            return
        registration = master.link.registration
        health = registration.get('health')
        if registration['state'] == 'failed':
            self._give_up(registration.get('error'))
        elif health and health['falls']:
            self._give_up(f'its health check {health["check"]} says DOWN (last: {health["last"]})')
        elif master.link.settled() and self._healthy(health):
            self.state = TAKEOVER_TAKEN
            self.channel.send(op='registered')
            master.link.own()

    def _healthy(self, health):
        """With a health check, the node the session kept (said UP by the
        old master's checks) vouches for the old code: the new one takes
        over once its own checks have passed `rise` times in a row; code
        that fails them `fall` times in a row gives up (see step)."""
        return health is None or health.get('passing', 0) >= self.master.settings.health_check_rise

    def _give_up(self, reason):
        """The registrar cannot register (the ZooKeeper credentials changed,
        say, and the node's ACL refuses them): no takeover. The old master is
        told why, and takes its session back once this one has stopped."""
        log.error('upgrade: the registration failed (%s): stopping; the old master (pid %d) serves on',
                  reason, self.peer)
        self.state = TAKEOVER_FAILED
        self.channel.send(op='failed', reason=f'could not register: {reason}')
        self.master.exit_status = 1
        self.master.signals.append(signal.SIGTERM)

    def _on_channel(self):
        messages = self.channel.messages()
        if messages is None:
            self._old_master_gone()
            return
        for message in messages:
            if message.get('op') == 'session' and self.state == TAKEOVER_AWAITING:
                self._resume(message)

    def _resume(self, message):
        if not self.master.serving():
            return  # stopping: the old master takes its session back once we are gone
        if message['secrets']:
            self.master.instance = message['instance']
        self.state = TAKEOVER_REGISTERING
        self.master.link.take_over(time.monotonic(), message['secrets'])

    def _old_master_gone(self):
        self.channel.close(self.master.selector)
        self.done = True
        if self.master.settings.pidfile:
            pidfile.drop_stale_oldbin(self.master.settings.pidfile)
        if self.state in (TAKEOVER_BOOTING, TAKEOVER_AWAITING) and self.master.serving():
            log.warning('the old master (pid %d) is gone before handing its session over: '
                        'registering with a session of our own', self.peer)
            self.master.link.take_over(time.monotonic())
        self.master.link.own()
        self.state = TAKEOVER_TAKEN
