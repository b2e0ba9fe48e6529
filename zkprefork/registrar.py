"""The registrar process: the only owner of a ZooKeeper session.

It is started by the master (``python -m zkprefork.registrar``, a fresh
interpreter: kazoo is not fork-safe and must never be shared) and never
forks. Its first stdin line is its configuration (JSON; secrets are named by
file or environment variable, never passed). Then it reads commands, one
JSON line each:

    {"op": "register", "endpoints": [[host, port], ...], "data": {...}}
    {"op": "unregister"}

End of file on stdin means the master is gone or done: the registrar closes
the session, which deletes its ephemeral nodes at once (not after the session
timeout), and exits.

It writes events on stdout, one JSON line each:

    {"event": "state", "state": "connected", "session": "0x10000a2b3c0001",
     "nodes": ["/svc/127.0.0.1:8080"], "since": 1700000000.123, "problems": [],
     "error": null}
    {"event": "unregistered"}

``state`` is ``connecting`` (no session yet), ``connected``, ``suspended``
(connection lost, the session may still be alive), ``lost`` (the session is
gone; a new one is being sought) or ``failed`` (a problem that retrying
cannot fix, named in ``error``: wrong credentials, a refused TLS handshake, a
server that refuses ephemeral nodes...; a register command with other data,
such as a reload's new generation, tries again). ``nodes`` are the full
paths (chroot included) owned by the current session; ``since`` is when
``state`` last changed; ``problems`` are the registrations held back, each
one line (a live server owns the name, a persistent node is in the way). A
state event is written, and logged, on every change of any of these.
"""
import json
import logging
import os
import queue
import signal
import sys
import threading
import time

import psutil
from kazoo.client import KazooClient, KazooState, KeeperState
from kazoo.exceptions import (
    AuthFailedError, BadArgumentsError, BadVersionError, EphemeralOnLocalSessionError,
    InvalidACLError, KazooException, NoAuthError, NoChildrenForEphemeralsError, NodeExistsError,
    NoNodeError, NotEmptyError, QuotaExceededError, RolledBackError, UnimplementedError)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from zkprefork import logsetup, nodeformat, proctitle, zksecurity

log = logging.getLogger('zkprefork.registrar')

# Seconds between reconnection attempts at most, before kazoo's ±40% jitter
# (so 2.8 s at worst); KazooClient's default back-off would grow to an hour.
RECONNECT_MAX_DELAY = 2.0
RETRY_SOON = 0.2  # seconds before another look, after losing a race for a node
RETRY_LATER = 1.0  # after an error that a live connection may not repeat
TLS_CHECK_AFTER = 1.5  # seconds without a connection before checking the TLS handshake
TLS_CHECK_EVERY = 5.0
# Serving without a session this long after the first register command is
# worth a warning (later losses show in the state lines).
UNREGISTERED_AFTER = 1.0
# Node ctime (ZooKeeper's clock) against a process start time (ours): a pid
# that started later than the node is not the process that made it.
CLOCK_SLACK = 2.0

# Errors that trying again cannot fix: reported as such, once.
PERMANENT = (NoAuthError, AuthFailedError, InvalidACLError, EphemeralOnLocalSessionError,
             NoChildrenForEphemeralsError, QuotaExceededError, BadArgumentsError,
             UnimplementedError)
# A node changed between our look and our write: look again.
RACES = (NodeExistsError, NoNodeError, BadVersionError, NotEmptyError)

OURS, STALE, FOREIGN, PERSISTENT = 'ours', 'stale', 'foreign', 'persistent'


def split_connection_string(value):
    """'h1:2181,h2/chroot' -> ('h1:2181,h2', [('h1', 2181), ('h2', 2181)], '/chroot')."""
    hosts, slash, chroot = value.strip().partition('/')
    addresses = [nodeformat.parse_address(member.strip()) or (member.strip().strip('[]'), 2181)
                 for member in hosts.split(',')]  # ZooKeeper's port when none is given
    return hosts, addresses, ('/' + chroot).rstrip('/') if slash else ''


def _join(parent, name):
    return parent.rstrip('/') + '/' + name


def _alive(pid, since):
    """Whether process `pid` runs here and was already running at `since`."""
    try:
        process = psutil.Process(pid)
        return (process.status() != psutil.STATUS_ZOMBIE
                and process.create_time() <= since + CLOCK_SLACK)
    except psutil.Error:
        return False


class Wanted:
    """One endpoint to register, and what we know of its node."""

    def __init__(self, node, base):
        self.base = base
        self.path = None
        self.ours = False  # confirmed owned by the current session
        self.set_node(node)

    def set_node(self, node):
        self.node = node
        if not node.sequential:
            self.path = _join(self.base, node.name)

    @property
    def target(self):
        """Where to create it: the name, or the prefix of a sequential node."""
        return _join(self.base, self.node.name) if self.node.sequential else self.path


class Registrar:

    def __init__(self, config, credentials, events_out):
        self.hosts, self.addresses, chroot = split_connection_string(config['zookeeper'])
        # The chroot is handled here rather than by kazoo, so that it is
        # created like any other missing parent.
        self.base = chroot + config['path'] if config['path'] != '/' else chroot or '/'
        self.format = config.get('node_format') or 'zk'
        self.properties = [tuple(pair) for pair in config.get('properties') or ()]
        self.credentials = credentials
        self.path_acl, self.node_acl = zksecurity.acls(self.credentials)
        self.tls_config = config if config.get('zookeeper_ca_file') else None
        self.out = events_out
        self.inbox = queue.Queue()
        self.wanted = []
        self.data = None  # of the last register command
        self.instance = None
        self.registered_at = None  # ms; the curator format shows it
        self.session = None
        self.state = 'connecting'  # until the first session
        self.failure = None
        self.failed_with = None  # the data registered when it failed
        self.problems = {}  # endpoint -> one line
        self.path_ready = False
        self.timers = {}  # job (a method) -> when to run it (monotonic)
        self.first_registration_checked = False
        self.reported = None
        self.since = time.time()
        self.op_timeout = max(config['session_timeout'] / 1000.0, 2.0)
        self.client = KazooClient(
            hosts=self.hosts,
            timeout=config['session_timeout'] / 1000.0,
            connection_retry=KazooRetry(max_tries=-1, max_delay=RECONNECT_MAX_DELAY),
            **zksecurity.client_options(config, self.credentials))
        # Listeners run on kazoo's connection thread and must not block: they
        # only pass the news (read there, while it is still true) on.
        self.client.add_listener(lambda state: self.inbox.put(
            ('state', (state, self.client.client_state, self.client.client_id))))
        self.client_running = False

    # -- the loop -------------------------------------------------------

    def run(self):
        threading.Thread(target=self._read_commands, daemon=True).start()
        self._start_client()
        self._report()
        while True:
            try:
                kind, value = self.inbox.get(timeout=self._sleep())
            except queue.Empty:
                kind, value = 'tick', None
            if kind == 'stop':
                break
            self._handle(kind, value)
            self._report()
        self._close_session()

    def _read_commands(self):
        for line in sys.stdin:
            self.inbox.put(('command', json.loads(line)))
        self.inbox.put(('stop', None))

    def _sleep(self):
        return max(0.0, min(self.timers.values()) - time.monotonic()) if self.timers else None

    def _at(self, delay, job):
        self.timers[job] = time.monotonic() + delay

    def _handle(self, kind, value):
        if kind == 'state':
            self._on_state(*value)
        elif kind == 'command' and value['op'] == 'register':
            self._register(value)
        elif kind == 'command' and value['op'] == 'unregister':
            self._unregister()
        elif kind == 'watch':
            self._ensure()
        elif kind == 'tls':
            self._on_tls_checked(value)
        elif kind == 'tick':
            self._tick()

    def _tick(self):
        now = time.monotonic()
        for job, due in list(self.timers.items()):
            if due <= now:
                del self.timers[job]
                job()

    def _watch(self, event):
        # Called on kazoo's event thread; one bound method, so that kazoo
        # keeps a single watcher per node however often it is set.
        self.inbox.put(('watch', event))

    # -- the session ----------------------------------------------------

    def _start_client(self):
        missing = zksecurity.missing_support(self.credentials)
        if missing:
            self._fail(missing)
            return
        self.client.start_async()
        self.client_running = True
        if self.tls_config:
            self._at(TLS_CHECK_AFTER, self._check_tls)

    def _stop_client(self):
        self.client_running = False
        self.timers.pop(self._check_tls, None)
        try:
            self.client.stop()
        except KazooException as error:
            log.warning('stopping the ZooKeeper client: %r', error)

    def _on_state(self, state, keeper_state, client_id):
        if state == KazooState.CONNECTED:
            session = client_id[0] if client_id else None
            if session != self.session:
                self.session = session
                self.path_ready = False
                for wanted in self.wanted:
                    wanted.ours = False
            self.state = 'connected'
            self.timers.pop(self._check_tls, None)
            self._ensure()
            return
        if state == KazooState.LOST:
            self.session = None
            for wanted in self.wanted:
                wanted.ours = False
            self.state = 'lost'
            if keeper_state == KeeperState.AUTH_FAILED:
                self._fail(self._rejected_credentials())
                return
        else:
            self.state = 'suspended'
        if self.tls_config and self.client_running and self._check_tls not in self.timers:
            self._at(TLS_CHECK_AFTER, self._check_tls)

    def _check_tls(self):
        # On a thread of its own: a host that drops packets would otherwise
        # keep the loop (and the master's commands) waiting.
        if self.state != 'connected' and self.client_running:
            threading.Thread(target=lambda: self.inbox.put(
                ('tls', zksecurity.tls_problem(self.addresses, self.tls_config))), daemon=True).start()

    def _on_tls_checked(self, problem):
        if self.state == 'connected' or not self.client_running:
            return
        if problem:
            self._fail(f'TLS handshake with ZooKeeper failed: {problem}')
        else:
            self._at(TLS_CHECK_EVERY, self._check_tls)

    def _fail(self, message):
        """A problem that retrying cannot fix: say it once and stop trying
        until what we register changes (a reload), or a restart."""
        if self.failure is None:
            log.error('%s; not retrying before the next reload or restart', message)
        self.failure = message
        self.failed_with = self.data
        self.timers.pop(self._ensure, None)
        if self.state != 'connected' and self.client_running:
            self._stop_client()

    def _rejected_credentials(self):
        return f'ZooKeeper rejected the credentials of {self.credentials.identity} (authentication failed)'

    def _close_session(self):
        try:
            self.client.stop()
            self.client.close()
        except KazooException as error:
            log.warning('closing the ZooKeeper session: %r', error)

    # -- commands -------------------------------------------------------

    def _register(self, message):
        data = message['data']
        self.instance = data.get('instance')
        if self.registered_at is None:
            self.registered_at = int(time.time() * 1000)
        nodes = nodeformat.nodes(self.format, self.base, message['endpoints'], data,
                                 self.properties, self.registered_at)
        before = {wanted.node.endpoint: wanted for wanted in self.wanted}
        self.wanted = []
        for node in nodes:
            wanted = before.pop(node.endpoint, None) or Wanted(node, self.base)
            wanted.set_node(node)
            self.wanted.append(wanted)
        self._delete([wanted for wanted in before.values() if wanted.ours])
        for endpoint in before:
            self.problems.pop(endpoint, None)
        if self.failure:
            self._retry_failed(data)
        self.data = data
        if not self.first_registration_checked:
            self._at(UNREGISTERED_AFTER, self._warn_unregistered)
        self._ensure()

    def _retry_failed(self, data):
        """A reload (a new generation), or any other change of what we
        register, is the occasion to try again after a failure."""
        if self.failed_with is None:
            self.failed_with = data  # failed before the first registration
        elif data != self.failed_with:
            self.failure = self.failed_with = None
            if not self.client_running:
                self._start_client()

    def _warn_unregistered(self):
        if self.state != 'connected' and not self.failure:
            log.warning('no ZooKeeper session (%s): serving unregistered; '
                        'registering as soon as ZooKeeper answers', self.hosts)
        self.first_registration_checked = True

    def _unregister(self):
        wanted, self.wanted = self.wanted, []
        self.problems.clear()
        self._delete([w for w in wanted if w.ours])
        self._emit(event='unregistered')

    def _delete(self, wanted):
        if self.state != 'connected':
            return
        for each in wanted:
            try:
                self._call(self.client.delete_async, each.path)
                log.info('unregistered %s', each.path)
            except NoNodeError:
                pass
            except (KazooException, KazooTimeoutError) as error:
                log.error('could not delete %s: %r (it goes with the session)', each.path, error)

    # -- making the nodes what they should be ---------------------------

    def _ensure(self):
        """Make every wanted node exist, owned by this session, with our data."""
        if self.failure or self.state != 'connected' or not self.wanted:
            return
        self.timers.pop(self._ensure, None)
        current = None
        try:
            self._ensure_path()
            for current in self.wanted:
                self._reconcile(current)
        except PERMANENT as error:
            self._fail(self._describe(error, current))
        except RACES as error:
            log.debug('%s changed under us (%r); looking again', self.base, error)
            if isinstance(error, NoNodeError):
                self.path_ready = False  # the service path went
            self._retry(RETRY_SOON)
        except (KazooException, KazooTimeoutError) as error:
            log.warning('registration in ZooKeeper interrupted (%r); trying again', error)
            self._retry(RETRY_LATER)

    def _retry(self, delay):
        self._at(delay, self._ensure)

    def _call(self, method, *args, **kwargs):
        """A kazoo request that cannot hang the loop: unanswered requests
        wait for a reconnection forever otherwise."""
        return method(*args, **kwargs).get(timeout=self.op_timeout)

    def _ensure_path(self):
        if self.path_ready or self.base == '/':
            return
        if not self._call(self.client.exists_async, self.base):
            parent = self.base.rpartition('/')[0]
            if parent:
                self._call(self.client.ensure_path_async, parent)
            try:
                self._call(self.client.create_async, self.base, acl=self.path_acl)
            except NodeExistsError:
                pass
        if self.credentials:
            self._check_path_acl()
        self.path_ready = True

    def _check_path_acl(self):
        acl, _ = self._call(self.client.get_acls_async, self.base)
        if zksecurity.open_to_anyone(acl):
            log.warning('the ACL of %s (made without credentials?) lets anyone create or delete '
                        'nodes there, so anyone may delete or fake registrations', self.base)

    def _reconcile(self, wanted):
        if wanted.node.sequential:
            self._reconcile_member(wanted)
        else:
            self._reconcile_named(wanted)
        if wanted.ours:
            self.problems.pop(wanted.node.endpoint, None)

    def _reconcile_named(self, wanted):
        try:
            raw, stat = self._call(self.client.get_async, wanted.path, watch=self._watch)
        except NoNodeError:
            self._create(wanted)
            return
        verdict = self._verdict(wanted.node.name, raw, stat)
        if verdict == OURS:
            wanted.ours = True
            if raw != wanted.node.data:
                self._update(wanted, stat)
        elif verdict == STALE:
            self._create(wanted, [(wanted.path, raw, stat)])
        else:
            self._hold_back(wanted, wanted.path, verdict, raw, stat)

    def _reconcile_member(self, wanted):
        """A sequential node's name is only known once made: find ours
        among the members by the endpoint it advertises."""
        if wanted.ours:
            try:
                raw, stat = self._call(self.client.get_async, wanted.path, watch=self._watch)
                if stat.ephemeralOwner == self.session:
                    if raw != wanted.node.data:
                        self._update(wanted, stat)
                    return
            except NoNodeError:
                pass
            wanted.ours = False
        mine, stale, held = [], [], []
        for name, raw, stat in self._members():
            if nodeformat.read_claim(self.format, name, raw, self.instance).endpoint != wanted.node.endpoint:
                continue
            verdict = self._verdict(name, raw, stat)
            entry = (_join(self.base, name), raw, stat)
            if verdict == OURS:
                mine.append(entry)
            elif verdict == STALE:
                stale.append(entry)
            else:
                held.append(entry + (verdict,))
        if mine:
            self._adopt(wanted, mine, stale)
        elif held:
            path, raw, stat, verdict = held[0]
            self._call(self.client.exists_async, path, watch=self._watch)
            self._hold_back(wanted, path, verdict, raw, stat)
        else:
            self._create(wanted, stale)

    def _adopt(self, wanted, mine, stale):
        """Our session already has a member (its create's answer was lost):
        keep one, and clear out any duplicate or stale one."""
        (path, raw, stat), extra = mine[0], mine[1:] + stale
        wanted.path, wanted.ours = path, True
        if extra:
            transaction = self.client.transaction()
            for other, _, other_stat in extra:
                transaction.delete(other, version=other_stat.version)
            self._commit(transaction)
        self._watch_ours(wanted)
        if raw != wanted.node.data:
            self._update(wanted, stat)

    def _watch_ours(self, wanted):
        """Be told when our node changes or goes. It may be gone already,
        deleted between our write and this look: then look again."""
        if not self._call(self.client.exists_async, wanted.path, watch=self._watch):
            wanted.ours = False
            self._retry(0)

    def _members(self):
        names = [name for name in self._call(self.client.get_children_async, self.base)
                 if name.startswith(nodeformat.MEMBER_PREFIX)]
        pending = [(name, self.client.get_async(_join(self.base, name))) for name in names]
        found = []
        for name, result in pending:
            try:
                found.append((name, *result.get(timeout=self.op_timeout)))
            except NoNodeError:
                pass  # gone since we listed it
        return found

    def _verdict(self, name, raw, stat):
        if stat.ephemeralOwner == self.session:
            return OURS
        if stat.ephemeralOwner == 0:
            return PERSISTENT
        claim = nodeformat.read_claim(self.format, name, raw, self.instance)
        # An earlier incarnation of this server: this master's previous
        # registrar, or a master that is no more (the name, or the endpoint
        # in the data, says it served our host and port).
        if claim.same_instance or (claim.pid and not _alive(claim.pid, stat.ctime / 1000.0)):
            return STALE
        return FOREIGN

    def _create(self, wanted, stale=()):
        self._write(wanted, stale)
        for path, raw, stat in stale:
            log.info('took over %s from an earlier session (0x%x) of this server: %s',
                     path, stat.ephemeralOwner, raw.decode(errors='replace'))
        log.info('registered %s %s', wanted.path, wanted.node.data.decode())

    def _write(self, wanted, replaced):
        """Create our node, deleting the `replaced` ones in the same
        transaction: never a moment without a node, nor one that will vanish
        with an old session later."""
        transaction = self.client.transaction()
        for path, _, stat in replaced:
            transaction.delete(path, version=stat.version)
        transaction.create(wanted.target, wanted.node.data, acl=self.node_acl,
                           ephemeral=True, sequence=wanted.node.sequential)
        wanted.path = self._commit(transaction)[-1]
        wanted.ours = True
        self._watch_ours(wanted)

    def _update(self, wanted, stat):
        if self.credentials:
            # Our ACL lets us write: an update in place, which watchers of
            # the children do not even notice.
            self._call(self.client.set_async, wanted.path, wanted.node.data, stat.version)
        else:
            # A world-readable node nobody may write: replace it in one step.
            self._write(wanted, [(wanted.path, b'', stat)])
        log.info('updated %s %s', wanted.path, wanted.node.data.decode())

    def _commit(self, transaction):
        results = transaction.commit_async().get(timeout=self.op_timeout)
        errors = [result for result in results if isinstance(result, Exception)]
        if errors:
            raise next((e for e in errors if not isinstance(e, RolledBackError)), errors[0])
        return results

    def _hold_back(self, wanted, path, verdict, raw, stat):
        if verdict == PERSISTENT:
            problem = (f'cannot register {path}: a persistent node of that name is in the way '
                       '(registrations are ephemeral); delete it and registration follows')
        else:
            problem = (f'cannot register {path}: it belongs to another live server '
                       f'(session 0x{stat.ephemeralOwner:x}, {raw.decode(errors="replace")}); '
                       'registering as soon as it goes')
        if self.problems.get(wanted.node.endpoint) != problem:
            log.error('%s', problem)
        self.problems[wanted.node.endpoint] = problem

    def _describe(self, error, wanted):
        path = wanted.target if wanted else self.base
        who = self.credentials.identity if self.credentials else 'an anonymous client'
        if isinstance(error, NoAuthError):
            hint = ('a wrong password, or an ACL that does not grant that user'
                    if self.credentials else 'set zookeeper_credentials_file or _env')
            return (f'ZooKeeper refused {who} to register {path} (NoAuth: {hint}; '
                    f'ZooKeeper checks the ACL of {self.base})')
        if isinstance(error, AuthFailedError):
            return self._rejected_credentials()
        if isinstance(error, EphemeralOnLocalSessionError):
            return (f'ZooKeeper refuses ephemeral nodes to this session: cannot register {path} '
                    '(EphemeralOnLocalSession: the server has local sessions that are never upgraded)')
        if isinstance(error, NoChildrenForEphemeralsError):
            return f'cannot register {path}: {self.base} is an ephemeral node, which cannot have children'
        return f'ZooKeeper refused to register {path}: {type(error).__name__}'

    # -- telling the master ---------------------------------------------

    def _emit(self, **event):
        _write_event(self.out, **event)

    def _report(self):
        state = 'failed' if self.failure else self.state
        nodes = sorted(wanted.path for wanted in self.wanted if wanted.ours)
        problems = sorted(self.problems.values())
        session = f'0x{self.session:x}' if self.session else None
        current = (state, session, nodes, problems, self.failure)
        if current == self.reported:
            return
        if not self.reported or self.reported[0] != state:
            self.since = time.time()
        self.reported = current
        # Every field every time: the master keeps the last value of each.
        self._emit(event='state', state=state, session=session, nodes=nodes,
                   since=round(self.since, 3), problems=problems, error=self.failure)
        log.info('ZooKeeper %s, session %s, registered: %s%s', state, session or 'none',
                 ', '.join(nodes) or 'nothing', ''.join(f'; {p}' for p in problems))


def main():
    # INT, HUP, TTIN, TTOU and USR1 arrive ignored (registrar_link): the
    # master orders the shutdown and reloads.
    signal.signal(signal.SIGUSR1, lambda signum, frame: logsetup.reopen())
    config = json.loads(sys.stdin.readline())
    try:
        credentials = zksecurity.read_credentials(config)
    except (OSError, ValueError) as error:
        credentials, unreadable = None, str(error)
    else:
        unreadable = None
    zksecurity.redact_logs(credentials)
    logsetup.configure(config.get('loggers'))
    proctitle.set(f'registrar {config["path"]}')
    if unreadable:
        _without_credentials(unreadable)
        return
    registrar = Registrar(config, credentials, sys.stdout)
    signal.signal(signal.SIGTERM, lambda signum, frame: registrar.inbox.put(('stop', None)))
    registrar.run()
    log.info('ZooKeeper session closed (pid %d)', os.getpid())


def _without_credentials(problem):
    """Serve the master without ZooKeeper until it is done: exiting would
    only have it start another registrar that fails the same way."""
    log.error('cannot read the ZooKeeper credentials: %s; not registering', problem)
    _write_event(sys.stdout, event='state', state='failed', session=None, nodes=[],
                 since=round(time.time(), 3), problems=[], error=problem)
    for line in sys.stdin:
        if json.loads(line)['op'] == 'unregister':
            _write_event(sys.stdout, event='unregistered')


def _write_event(out, **event):
    out.write(json.dumps(event) + '\n')
    out.flush()


if __name__ == '__main__':
    main()
