"""The registrar process: the only owner of a ZooKeeper session.

It is started by the master (``python -m zkprefork.registrar``, a fresh
interpreter: kazoo is not fork-safe and must never be shared) and never
forks. Its first stdin line is its configuration (a RegistrarConfig;
secrets are named by file or environment variable, never passed); then it
reads commands (register, unregister) and writes events (state,
unregistered, session), one JSON line each, as registrar_protocol.py
defines them. What it registers is a desired state (the last register
command's nodes, while the health check, if any, passes; none after an
unregister command), which it converges ZooKeeper to, retrying until
ZooKeeper confirms; `unregistered` is said once ZooKeeper confirmed every
delete, or the session that held the nodes is gone.

There is one way out (Registrar._leave), whatever ends the loop: end of
file on stdin (the master is gone or done), a broken pipe to the master, a
signal, an error. It closes the session, which deletes its ephemeral nodes
at once (not after the session timeout), and exits. Disconnected then, with
a session that may hold nodes, it keeps trying to reach ZooKeeper for up to
the session timeout (ZooKeeper restores sessions at restart), and closes the
session as soon as it answers.

``state`` is ``connecting`` (no session yet), ``connected``, ``suspended``
(connection lost, the session may still be alive), ``lost`` (the session is
gone; a new one is being sought) or ``failed`` (a problem that retrying
cannot fix, named in ``error``: wrong credentials, a refused TLS handshake, a
server that refuses ephemeral nodes...; a register command with other data,
such as a reload's new generation, tries again). ``nodes`` are the full
paths (chroot included) that ZooKeeper confirmed the current session holds; ``since`` is when
``state`` last changed; ``problems`` are the registrations held back, each
one line (a live server owns the name, a persistent node is in the way). A
state event is written, and logged, on every change of any of these.

The session (zksession.Session), the nodes (zknodes.Nodes) and the health
check (healthcheck.py) are their own rooms; this module is the loop that
feeds them the master's commands, kazoo's news, the checks' results and the
timers, and reports their state. A session is kept however long ZooKeeper
is unreachable (a restarted ZooKeeper restores it with a fresh timeout); it
is replaced only when ZooKeeper says it expired (kazoo then starts a new
one) or refuses it, having lost its data (a new client then starts one).
"""
import logging
import os
import signal
import sys
import threading
import time

from zkprefork import logsetup, proctitle
from zkprefork.registrar import healthcheck, nodes as zknodes, security as zksecurity, session as zksession
from zkprefork.registrar.inbox import (
    COMMAND, END, HEALTH, STATE, STOP, TICK, TLS, WATCH, ZXID, Inbox, UnknownKind)
from zkprefork.registrar.protocol import (
    HandOver, Own, Ping, Pong, ProtocolError, RegistrarConfig, Register, SessionHeld, State, Unregister,
    Unregistered, read_command)

log = logging.getLogger('zkprefork.registrar')

# Serving without a session this long after the first register command is
# worth a warning (later losses show in the state lines).
UNREGISTERED_AFTER = 1.0


class Timers:
    """Jobs (callables) due at monotonic times; one pending run per job."""

    def __init__(self):
        self.due = {}

    def at(self, delay, job):
        self.due[job] = time.monotonic() + delay

    def cancel(self, job):
        self.due.pop(job, None)

    def pending(self, job):
        return job in self.due

    def wait(self):
        """Seconds until the next job is due; None without one."""
        return max(0.0, min(self.due.values()) - time.monotonic()) if self.due else None

    def run_due(self):
        now = time.monotonic()
        for job, due in list(self.due.items()):
            if due <= now:
                del self.due[job]
                job()


class Registrar:
    """The loop: one thread runs every decision; kazoo's threads, the TLS
    check and the stdin reader only post to its inbox."""

    def __init__(self, config, credentials, events_out):
        self.out = events_out
        self.config = config
        self.inbox = Inbox()
        self.timers = Timers()
        self.session = zksession.Session(config, credentials, self.inbox.post, self.timers)
        self.nodes = zknodes.Nodes(config, self.session, self._watch)
        self.failed_with = None  # the data registered when it failed
        self.unregistering = False  # an unregister command awaits ZooKeeper's confirmation
        self.command = None  # the last register command, while it stands
        self.health = config.health and healthcheck.Health(
            config.health.path, config.health.rise, config.health.fall, config.health_up)
        self.checker = None
        self.first_registration_checked = False
        self.reporter = Reporter(events_out)
        # A live upgrade's session: leaving keeps it open (HandOver, or
        # handed to us until Own) for the other master's registrar.
        self.keep_session = config.handed_over

    def run(self):
        """Serve the master until it is gone or done, a signal or an error;
        then leave, always the same way."""
        try:
            self._serve()
        except BrokenPipeError:
            log.warning('the master is gone (it no longer reads what we write)')
            _drop_output(self.out)
        except BaseException as error:
            log.error('the registrar failed (%r): leaving', error)
            raise
        finally:
            self._leave()

    def _serve(self):
        threading.Thread(target=read_commands, args=(self.inbox.post,), daemon=True).start()
        self._start_client()
        self._report()
        while True:
            kind, value = self.next_message()
            if kind in (STOP, END) or isinstance(value, HandOver):
                self.keep_session = self.keep_session or isinstance(value, HandOver)
                return
            self._handle(kind, value)
            self._confirm_unregistered()
            self._report()

    def next_message(self, deadline=None):
        """The next (kind, value) from the inbox; (TICK, None) when a
        timer (or the `deadline`, monotonic) is due first."""
        due = [t for t in (self.timers.wait(), deadline and max(0.0, deadline - time.monotonic()))
               if t is not None]
        return self.inbox.next(min(due) if due else None)

    def _leave(self):
        """The one way out. Nothing more is registered, checked or told
        the master; the session is closed, which deletes its nodes. If
        ZooKeeper cannot be reached now and the session may hold nodes,
        wait for it up to a session timeout first, so that the nodes go as
        soon as it answers, not a session timeout later.

        In a live upgrade (`keep_session`) the session is left open
        instead: the process exits at once, without a word to ZooKeeper
        (kazoo's stop() would close it), and the other master's registrar
        resumes it, nodes and all."""
        try:
            if self.checker:
                self.checker.stop()
            for job in (self._ensure, self._warn_unregistered):
                self.timers.cancel(job)
            if self.keep_session:
                _exit_keeping_session(self.session)
            if must_wait(self.session, self.nodes):
                timeout = self.config.session_timeout / 1000.0
                log.warning('ZooKeeper unreachable at exit: closing the session (and deleting the node) '
                            'as soon as it answers, for up to %g s', timeout)
                wait_for_zookeeper(self, time.monotonic() + timeout)
        finally:
            self.session.close()

    def stop(self):
        self.inbox.post(STOP, None)

    def _handle(self, kind, value):
        handlers = {
            STATE: lambda: self._on_state(*value), COMMAND: lambda: self._on_command(value),
            WATCH: self._ensure, TLS: lambda: self._problem(self.session.on_tls_checked(value)),
            TICK: self.timers.run_due, HEALTH: lambda: self._on_health(*value),
            ZXID: lambda: self._on_probed(*value)}
        if kind not in handlers:
            raise UnknownKind(f'the registrar has no handler for {kind!r}')
        handlers[kind]()

    def _on_command(self, command):
        if isinstance(command, Register):
            self._register(command)
        elif isinstance(command, Unregister):
            self._unregister()
        elif isinstance(command, Own):
            log.info('the upgrade is done: this registrar owns session 0x%x', self.session.id or 0)
            self.keep_session = False
        elif isinstance(command, Ping):
            self._emit(Pong(command.seq))  # from this loop: it runs

    def _watch(self, event):
        # Called on kazoo's event thread; one bound method, so that kazoo
        # keeps a single watcher per node however often it is set.
        self.inbox.post(WATCH, event)

    # -- the session ----------------------------------------------------

    def _start_client(self):
        self._problem(self.session.start())

    def _on_state(self, generation, state, keeper_state, client_id):
        before = self.session.id
        problem = self.session.on_state(generation, state, keeper_state, client_id)
        if self.session.state == 'lost':
            self.nodes.session_lost()
        elif self.session.id != before:
            self.nodes.new_session()
        if self.session.id and self.session.id != before:
            self._emit(SessionHeld(self.session.id, self.session.password.hex()))
        if problem:
            self._fail(problem)
        elif self.session.connected:
            self._ensure()

    def _on_probed(self, generation, zxid):
        """However long ZooKeeper has been unreachable, the session is given
        up only when ZooKeeper refuses it (or says it expired), or closed
        (while unregistering) as soon as ZooKeeper answers a probe."""
        if self.session.failure:
            return
        if self.session.on_probed(generation, zxid):
            self.session.renew()
            self.nodes.new_session()
        elif self.unregistering and closed_on_answer(self.session, zxid):
            self.nodes.session_lost()

    def _problem(self, problem):
        if problem:
            self._fail(problem)

    def _fail(self, message):
        """A problem that retrying cannot fix: said once; nothing is tried
        until what we register changes (a reload), or a restart."""
        self.session.fail(message)
        self.failed_with = self.nodes.data
        self.timers.cancel(self._ensure)

    # -- commands -------------------------------------------------------

    def _register(self, command):
        self.unregistering = False
        self.command = command
        self._start_checker(command.endpoints)
        if self.checker:
            self.checker.follow(command.data)
        self._want()

    def _want(self):
        """The desired state: the command's nodes, while the health check
        (if any) says UP (or the session is a live upgrade's, not yet ours:
        its nodes are the old master's); none otherwise."""
        command = self.command
        healthy = self.health is None or self.health.up or self.keep_session
        self.nodes.register(command.endpoints if healthy else (), command.data)
        if self.session.failure:
            self._retry_failed(command.data)
        if not self.first_registration_checked and healthy:
            self.timers.at(UNREGISTERED_AFTER, self._warn_unregistered)
        self._ensure()

    # -- the health check -----------------------------------------------

    def _start_checker(self, endpoints):
        if self.health and not self.checker and endpoints:
            host, port = endpoints[0]
            self.checker = healthcheck.Checker(self.config.health, self.config.health.host or host,
                                               port, self.inbox.post)
            self.checker.start()

    def _on_health(self, passed, detail):
        if not self.health.record(passed, detail):
            return
        if self.health.up:
            log.info('%s: registering', self.health.describe())
        else:
            log.warning('%s: %s', self.health.describe(), "the live upgrade's node stays (the old master's)"
                        if self.keep_session else 'unregistering')
        if self.command:
            self._want()

    def _retry_failed(self, data):
        """A reload (a new generation), or any other change of what we
        register, is the occasion to try again after a failure."""
        if self.failed_with is None:
            self.failed_with = data  # failed before the first registration
        elif data != self.failed_with:
            self.failed_with = None
            self._problem(self.session.retry())

    def _warn_unregistered(self):
        if not (self.session.connected or self.nodes.registered() or self.session.failure
                or self.unregistering):
            log.warning('no ZooKeeper session (%s): serving unregistered; '
                        'registering as soon as ZooKeeper answers', self.session.config.hosts)
        self.first_registration_checked = True

    def _unregister(self):
        """Said done only once ZooKeeper confirms every delete (or the
        session that held the nodes is gone): the master keeps accepting
        until then, so that no node points at a closed port."""
        self.unregistering = True
        self.command = None
        self.nodes.unregister()
        self.session.hurry_probes()
        self._ensure()

    def _confirm_unregistered(self):
        if self.unregistering and self.nodes.settled():
            self.unregistering = False
            self._emit(Unregistered())

    def _ensure(self):
        if not self.session.connected or (self.session.failure and self.nodes.settled()):
            return
        self.timers.cancel(self._ensure)
        try:
            delay = self.nodes.ensure(deletes_only=bool(self.session.failure))
        except zknodes.Refused as refused:
            if self.unregistering and zksession.end(self.session, refused):
                self.nodes.session_lost()
            else:
                self._fail(str(refused))
            return
        if delay is not None:
            self.timers.at(delay, self._ensure)

    # -- telling the master ---------------------------------------------

    def _emit(self, event):
        _write_event(self.out, event)

    def _report(self):
        self.reporter.report(self.session, self.nodes, self.health, time.time())


class Reporter:
    """The state events: one on every change (the health check's counts
    included), and a log line when more than those counts changed."""

    def __init__(self, out):
        self.out = out
        self.reported = None
        self.since = time.time()

    def report(self, session, nodes, health, wall_now):
        """`wall_now`: seconds since the epoch, the `since` of a new state."""
        state = 'failed' if session.failure else session.state
        registered = nodes.registered()
        problems = sorted(nodes.problems.values())
        session_id = f'0x{session.id:x}' if session.id else None
        current = (state, session_id, registered, problems, session.failure)
        health = health.status() if health else None
        if (current, health) == self.reported:
            return
        changed = not self.reported or self.reported[0] != current
        if not self.reported or self.reported[0][0] != state:
            self.since = wall_now
        self.reported = (current, health)
        _write_event(self.out, State(state, session_id, registered, round(self.since, 3), problems,
                                     session.failure, health))
        if changed:
            held = ', '.join(registered) or ('not known yet (resuming a session)'
                                             if nodes.resumed else 'nothing')
            log.info('ZooKeeper %s, session %s, registered: %s%s', state, session_id or 'none',
                     held, ''.join(f'; {p}' for p in problems))


def must_wait(session, nodes):
    """Whether leaving waits for ZooKeeper: the session may hold nodes and
    may still come back."""
    return (session.running and not session.failure and not session.refused
            and session.state in ('connecting', 'suspended') and nodes.may_hold())


def wait_for_zookeeper(registrar, deadline):
    """While leaving, only the session's news count: connected (closing
    deletes the nodes), lost or refused (the nodes are gone with it), a
    probe that ZooKeeper answered (the session is closed from a new client:
    ours may be sleeping out its back-off), a signal (give up waiting) or
    the `deadline` (monotonic)."""
    session = registrar.session
    session.hurry_probes()
    while must_wait(session, registrar.nodes) and time.monotonic() < deadline:
        kind, value = registrar.next_message(deadline)
        if kind == STOP:
            return
        if kind == STATE:
            session.on_state(*value)
        elif kind == ZXID:
            if not session.on_probed(*value) and closed_on_answer(session, value[1]):
                return
        elif kind == TICK:
            registrar.timers.run_due()


def closed_on_answer(session, zxid):
    """After a probe that found ZooKeeper answering (`zxid` not None) while
    our client is not connected (it may be sleeping out its reconnection
    back-off), end the session from a new client. True once ended."""
    if zxid is None or session.connected or not zksession.close_from_new_client(session):
        return False
    log.info('ZooKeeper answers again: closed the session (and its nodes) from a new client')
    return True


def read_commands(post):
    """The stdin reader's thread: each command line posted as COMMAND."""
    try:
        for line in sys.stdin:
            try:
                post(COMMAND, read_command(line))
            except ProtocolError as error:
                log.error('ignoring a line from the master: %s', error)
    finally:
        # Whatever ends the reading (a line that is not even text too),
        # the master is not heard any more: leave, never linger.
        post(END, None)


def _exit_keeping_session(session):
    """Exit now, the session left open: the process's end drops the TCP
    connection without the close request that kazoo's stop() would send."""
    if session.id:
        log.info('leaving session 0x%x open for the next registrar (live upgrade); exiting (pid %d)',
                 session.id, os.getpid())
    else:
        log.info('no session to leave to the next registrar (live upgrade); exiting (pid %d)', os.getpid())
    logging.shutdown()
    os._exit(0)


def main():
    # INT, HUP, TTIN, TTOU and USR1 arrive ignored (registrar_link): the
    # master orders the shutdown and reloads.
    signal.signal(signal.SIGUSR1, lambda signum, frame: logsetup.reopen())
    config = RegistrarConfig.read(sys.stdin.readline())
    try:
        credentials = zksecurity.read_credentials(config.credentials)
    except (OSError, ValueError) as error:
        credentials, unreadable = None, str(error)
    else:
        unreadable = None
    zksecurity.redact_logs(credentials or zksecurity.own_credentials(config.identity))
    logsetup.configure(config.loggers)
    zksession.quiet_kazoo_repeats()
    proctitle.set(f'registrar {config.path}')
    if unreadable:
        _without_credentials(config, unreadable)
        return
    registrar = Registrar(config, credentials, sys.stdout)
    signal.signal(signal.SIGTERM, lambda signum, frame: registrar.stop())
    registrar.run()
    log.info('ZooKeeper session closed (pid %d)', os.getpid())


def _without_credentials(config, problem):
    """Serve the master without ZooKeeper until it is done: exiting would
    only have it start another registrar that fails the same way, until
    what is registered changes (a reload: the master holds the file anew),
    which ends this one so that the master starts another. A session the
    last registrar left (and its node) is closed first: what is reported,
    no node, is then what ZooKeeper holds."""
    log.error('cannot read the ZooKeeper credentials: %s; not registering', problem)
    if config.resume:
        _close_session_left(config)
    _write_event(sys.stdout, State('failed', None, [], round(time.time(), 3), [], problem, None))
    first = None
    for line in sys.stdin:
        try:
            command = read_command(line)
        except ProtocolError as error:
            log.error('ignoring a line from the master: %s', error)
            continue
        if isinstance(command, Register):
            first = first or command.data
            if command.data != first:
                log.info('what is registered changed: exiting, for a registrar that reads the '
                         'credentials again')
                return
        elif isinstance(command, Unregister):
            _write_event(sys.stdout, Unregistered())
        elif isinstance(command, Ping):
            _write_event(sys.stdout, Pong(command.seq))
        elif isinstance(command, HandOver):
            return  # no session to leave


def _close_session_left(config):
    """Resume the last registrar's session only to close it, which needs no
    credentials (ZooKeeper checks ACLs on nodes, not on a session's close).
    Bounded by the session timeout, after which ZooKeeper expires it anyway."""
    session_id, password = config.resume
    timeout = config.session_timeout / 1000.0
    if zksession.close_session(config, zksecurity.own_credentials(config.identity),
                               (session_id, bytes.fromhex(password)), timeout):
        log.info('closed session 0x%x, and with it the node(s) it held', session_id)
    else:
        log.warning('could not reach ZooKeeper to close session 0x%x: it expires within %g s',
                    session_id, timeout)


def _write_event(out, event):
    out.write(event.line())
    out.flush()


def _drop_output(out):
    """Point `out` at /dev/null: what its buffer holds for a reader who is
    gone would otherwise raise again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
