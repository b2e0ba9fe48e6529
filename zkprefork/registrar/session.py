"""The registrar's ZooKeeper session: one KazooClient, its states, the TLS
check, and the failures that retrying cannot fix.

Everything here runs in the registrar's loop, except kazoo's state listener
and the TLS check's thread, which only pass news on with `post(kind, value)`.
"""
import logging
import math
import random
import threading
import time

from kazoo.client import KazooClient, KazooState, KeeperState
from kazoo.exceptions import KazooException, NoNodeError, RolledBackError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from zkprefork.registrar import security as zksecurity
from zkprefork.registrar.inbox import STATE, TLS, ZXID

log = logging.getLogger('zkprefork.registrar')
# The probe's own kazoo logger: its attempts fail while ZooKeeper is down,
# which the registrar's client says already.
PROBE_LOG = logging.getLogger('kazoo.client.probe')

# Seconds between reconnection attempts at most, before kazoo's ±40% jitter
# (so 2.8 s at worst); KazooClient's default back-off would grow to an hour.
RECONNECT_MAX_DELAY = 2.0
# Seconds a connection attempt may wait for ZooKeeper's answer, at most.
# kazoo waits session timeout / number of hosts: with one server, the whole
# session timeout. A ZooKeeper that accepts connections before it serves
# (3.8 does, as it starts) and never answers that one then keeps the
# registrar waiting until its session has expired on the server, which
# deletes the node: a gap, seconds after ZooKeeper came back.
CONNECT_TIMEOUT = 2.0
TLS_CHECK_AFTER = 1.5  # seconds without a connection before checking the TLS handshake
TLS_CHECK_EVERY = 5.0
# A session is given up only when ZooKeeper says it expired (kazoo then
# reports LOST) or refuses it. ZooKeeper refuses, for ever and without a
# word (it just closes the connection), a client that has seen a later zxid
# than its own: one that lost its data. A fresh client, after this many
# seconds disconnected and then every PROBE_EVERY, asks its zxid to find out.
PROBE_AFTER = 1.0
PROBE_EVERY = 1.0
LEAVING_PROBE_EVERY = 0.25  # while leaving, each second counts: the node points at a closed port
# kazoo warns of a host it cannot resolve on every attempt (~10 a second
# for one unresolvable host): the first is logged, then one per this many seconds.
REPEAT_EVERY = 30.0


class Session:
    """The client, and what the registrar knows of its session.

    `state` is 'connecting' (no session yet), 'connected', 'suspended'
    (connection lost, the session may still be alive) or 'lost' (the session
    is gone; kazoo seeks a new one); `id` is the session id while there is
    one; `failure` a problem that retrying cannot fix (one line), or None.
    """

    def __init__(self, config, credentials, post, timers):
        """`config`: a RegistrarConfig; `credentials`: the user's
        zksecurity.Credentials or None (then the master's own identity in
        `config` authenticates); `post(kind, value)`: hands news to the loop
        from any thread; `timers`: the loop's Timers."""
        self.config = config
        self.credentials = credentials
        self.identity = credentials or zksecurity.own_credentials(config.identity)
        self.post = post
        self.timers = timers
        self.state = 'connecting'
        self.id = None
        self.failure = None
        self.running = False
        self.op_timeout = max(config.session_timeout / 1000.0, 2.0)
        self.client = None
        self.clients = 0  # how many clients were made: news from an older one is stale
        self.had_session = False  # this client had a session: it remembers a zxid
        self.refused_at = None  # ZooKeeper's zxid when it refuses the session, or None
        self.password = None  # of the session, while there is one
        self.probe_every = PROBE_EVERY  # seconds between probes
        self.closed = False  # the session was ended (end, close_from_new_client)
        resume = config.resume and (config.resume[0], bytes.fromhex(config.resume[1]))
        self._new_client(resume)

    def _new_client(self, client_id=None):
        self.clients += 1
        self.had_session = False
        generation = self.clients
        client = KazooClient(
            hosts=kazoo_hosts(self.config), randomize_hosts=False,
            timeout=self.config.session_timeout / 1000.0,
            connection_retry=KazooRetry(max_tries=-1, max_delay=RECONNECT_MAX_DELAY),
            client_id=client_id,
            **zksecurity.client_options(self.config.tls, self.identity))
        # Listeners run on kazoo's connection thread and must not block: they
        # only pass the news (read there, while it is still true) on.
        client.add_listener(lambda state: self.post(
            STATE, (generation, state, client.client_state, client.client_id)))
        self.client = client

    @property
    def connected(self):
        return self.state == 'connected'

    def start(self):
        """Connect whenever ZooKeeper answers. Returns a problem (one line)
        if connecting cannot even be tried, else None."""
        # TLS files that do not load would only have kazoo retry them for ever.
        problem = zksecurity.missing_support(self.identity) or (
            self.config.tls and zksecurity.tls_files_problem(self.config.tls))
        if problem:
            return problem
        self.client.start_async()
        self.running = True
        if self.config.tls:
            self.timers.at(TLS_CHECK_AFTER, self.check_tls)
        return None

    def stop(self):
        self.running = False
        self.timers.cancel(self.check_tls)
        self.timers.cancel(self.probe)
        try:
            self.client.stop()
        except KazooException as error:
            log.warning('stopping the ZooKeeper client: %r', error)

    def close(self):
        """End the session: ZooKeeper deletes its ephemeral nodes at once."""
        if not self.closed:
            close_quietly(self.client)

    def renew(self):
        """Give up the session for a new one, with a new client: kazoo keeps
        offering the old session, and the last zxid it saw, for ever, and a
        ZooKeeper that lost its data refuses both ("client has seen zxid
        ..."). A node the old session may still hold is found as stale and
        taken over."""
        if self.refused_at is not None:
            log.warning('ZooKeeper refuses our session: it is at zxid 0x%x, behind the 0x%x our '
                        'session saw (it lost its data): starting a new session',
                        self.refused_at, self.client.last_zxid)
        old = self.client
        self._new_client()
        self.id = self.password = None
        self.state = 'connecting'
        self.refused_at = None
        self.timers.cancel(self.probe)
        if self.running:
            self.client.start_async()
        # Stopping a client that is not connected may wait for its
        # connection thread: not in the loop.
        threading.Thread(target=close_quietly, args=(old,), daemon=True).start()

    def on_state(self, generation, state, keeper_state, client_id):
        """Kazoo's news, in the loop. Returns a problem that retrying cannot
        fix, or None."""
        if generation != self.clients:
            return None  # from a client given up already
        if state == KazooState.CONNECTED:
            self.id, self.password = client_id or (None, None)
            self.state = 'connected'
            self.had_session = True
            self.timers.cancel(self.check_tls)
            self.timers.cancel(self.probe)
            return None
        if state == KazooState.LOST:
            self.id = self.password = None
            self.state = 'lost'
            if keeper_state == KeeperState.AUTH_FAILED:
                return self.rejected_credentials()
        else:
            self.state = 'suspended'
        if self.config.tls and self.running and not self.timers.pending(self.check_tls):
            self.timers.at(TLS_CHECK_AFTER, self.check_tls)
        if self.had_session and not self.timers.pending(self.probe):
            self.timers.at(PROBE_AFTER, self.probe)
        return None

    @property
    def refused(self):
        return self.refused_at is not None

    def probe(self):
        # On a thread of its own, as check_tls: connecting may take a while.
        if self.connected or not self.running or not self.had_session:
            return
        generation, options = self.clients, zksecurity.client_options(self.config.tls, self.identity)
        threading.Thread(target=lambda: self.post(
            ZXID, (generation, server_zxid(self.config.hosts, options))), daemon=True).start()

    def hurry_probes(self):
        """Leaving or unregistering: each second the node outlives the port
        counts. Probe at once (if disconnected), then every LEAVING_PROBE_EVERY."""
        self.probe_every = LEAVING_PROBE_EVERY
        if not self.connected:
            self.probe()

    def on_probed(self, generation, zxid):
        """The probe's answer, in the loop: True if ZooKeeper refuses our
        session (its zxid is behind the last one our client saw, the very
        test ZooKeeper applies), which then stays refused until renew()."""
        if generation != self.clients or self.connected or not self.running:
            return False
        if zxid is not None and zxid < self.client.last_zxid:
            self.refused_at = zxid
            return True
        self.timers.at(self.probe_every, self.probe)
        return False

    def check_tls(self):
        # On a thread of its own: a host that drops packets would otherwise
        # keep the loop (and the master's commands) waiting.
        if not self.connected and self.running:
            threading.Thread(target=lambda: self.post(TLS, tls_failure(self.config)),
                             daemon=True).start()

    def on_tls_checked(self, problem):
        """The check's result (tls_failure), in the loop. Returns it as a
        problem that retrying cannot fix, or None."""
        if self.connected or not self.running:
            return None
        if problem:
            return problem
        self.timers.at(TLS_CHECK_EVERY, self.check_tls)
        return None

    def fail(self, message):
        """A problem that retrying cannot fix: say it once, and stop a client
        that is not connected (it would only retry) until retry()."""
        if self.failure is None:
            log.error('%s; not retrying before the next reload or restart', message)
        self.failure = message
        if not self.connected and self.running:
            self.stop()

    def retry(self):
        """Try again after a failure. Returns a problem if connecting cannot
        even be tried, else None."""
        self.failure = None
        return None if self.running else self.start()

    def rejected_credentials(self):
        return f'ZooKeeper rejected the credentials of {self.credentials.identity} (authentication failed)'

    # -- requests --------------------------------------------------------

    def call(self, request, *args, **kwargs):
        """KazooClient's `request` ('get', 'exists', 'create'...), answered
        within the operation timeout: unanswered requests wait for a
        reconnection forever otherwise. Raises what kazoo raises, or
        KazooTimeoutError."""
        return getattr(self.client, request + '_async')(*args, **kwargs).get(timeout=self.op_timeout)

    def get_many(self, paths):
        """[(path, data, stat)] of those `paths` that exist, asked all at once."""
        pending = [(path, self.client.get_async(path)) for path in paths]
        found = []
        for path, result in pending:
            try:
                found.append((path, *result.get(timeout=self.op_timeout)))
            except NoNodeError:
                pass  # gone since it was listed
        return found

    def transaction(self):
        return self.client.transaction()

    def commit(self, transaction):
        """The results of `transaction`; its first real error raised if any
        operation failed (the others then only say RolledBack)."""
        results = transaction.commit_async().get(timeout=self.op_timeout)
        errors = [result for result in results if isinstance(result, Exception)]
        if errors:
            raise next((e for e in errors if not isinstance(e, RolledBackError)), errors[0])
        return results


class QuietRepeats(logging.Filter):
    """Of the records whose message starts with `prefix`, lets the first
    through, then one per `every` seconds, saying how many it held back."""

    def __init__(self, prefix, every):
        super().__init__()
        self.prefix = prefix
        self.every = every
        self.last = None
        self.held = 0

    def filter(self, record):
        if not str(record.msg).startswith(self.prefix):
            return True
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every:
            self.held += 1
            return False
        if self.held:
            record.msg = f'{record.msg} ({self.held} more like it in the last {now - self.last:.0f} s)'
        self.last, self.held = now, 0
        return True


def quiet_kazoo_repeats():
    """Throttle kazoo's warnings that repeat on every connection attempt."""
    logging.getLogger('kazoo.client').addFilter(QuietRepeats('Cannot resolve', REPEAT_EVERY))
    PROBE_LOG.setLevel(logging.ERROR)


def close_quietly(client):
    """Stop and close a kazoo client; a failure is logged, never raised.
    True if closed without one."""
    try:
        client.stop()
        client.close()
    except KazooException as error:
        log.warning('closing the ZooKeeper session: %r', error)
        return False
    return True


def end(session, refused):
    """End the session now: unregistering, when ZooKeeper `refused` a delete
    (ZooKeeper deletes a closed session's ephemeral nodes whatever their
    ACL). True once ended."""
    log.warning('%s: closing the session, which deletes its nodes', refused)
    if not close_quietly(session.client):
        return False
    _ended(session)
    return True


def _ended(session):
    """No session any more: it was closed."""
    session.id = session.password = None
    session.state = 'lost'
    session.running = False
    session.closed = True


def close_from_new_client(session):
    """End the session through a new client, now: ZooKeeper answers one
    (the probe said so) while ours may wait out its reconnection back-off
    (up to 1.4 x RECONNECT_MAX_DELAY), longer than a leaving registrar
    has left. True once closed (its nodes are gone)."""
    if not close_session(session.config, session.identity, (session.id, session.password), CONNECT_TIMEOUT):
        return False
    _ended(session)
    # Ours, still reconnecting, may take seconds to stop (a connect attempt
    # under way): neither the loop nor the way out waits for it (its threads
    # are daemons, as this one).
    threading.Thread(target=close_quietly, args=(session.client,), daemon=True).start()
    return True


def close_session(config, identity, client_id, timeout):
    """Resume the session `client_id` ((id, password bytes)) on a new client
    of `config` authenticated as `identity`, only to close it, which deletes
    its ephemeral nodes; `timeout` (seconds) bounds the connection. True
    once closed."""
    client = KazooClient(hosts=kazoo_hosts(config), timeout=config.session_timeout / 1000.0,
                         client_id=client_id, logger=PROBE_LOG,
                         **zksecurity.client_options(config.tls, identity))
    try:
        client.start(timeout)
    except (KazooTimeoutError, KazooException):
        close_quietly(client)
        return False
    return close_quietly(client)


def kazoo_hosts(config):
    """The hosts string for kazoo (which must not shuffle it again): the
    servers (each once: settings removes repeats) shuffled once, as
    ZooKeeper's own client does, then that round repeated as often as it
    takes for kazoo's connect timeout (session timeout / number of hosts)
    to be CONNECT_TIMEOUT at most, so that several attempts fit in a
    session. Kazoo shuffling the repeats would try a frozen server twice in
    a row now and then, losing two connect timeouts to it."""
    servers = [server.strip() for server in config.hosts.split(',')]
    random.shuffle(servers)
    attempts = math.ceil(config.session_timeout / 1000.0 / CONNECT_TIMEOUT / len(servers))
    return ','.join(servers * max(1, attempts))


def tls_failure(config):
    """Why the client of `config` (a RegistrarConfig with TLS) gets no TLS
    session, in one line, or None: its files no longer load (changed since
    the start: a thread's traceback and kazoo's endless retries otherwise),
    or the handshake fails. Blocks for a handshake: not in the loop."""
    problem = zksecurity.tls_files_problem(config.tls)
    if problem is None:
        handshake = zksecurity.tls_problem(config.addresses, config.tls)
        problem = handshake and f'TLS handshake with ZooKeeper failed: {handshake}'
    return problem


def server_zxid(hosts, options):
    """The last zxid of the ZooKeeper that a new client (KazooClient
    `options`) reaches at `hosts`, or None if none answers in time. After a
    sync, so that a follower has caught up with its leader first."""
    client = KazooClient(hosts=hosts, timeout=CONNECT_TIMEOUT, logger=PROBE_LOG, **options)
    try:
        client.start(CONNECT_TIMEOUT)
        client.sync_async('/').get(timeout=CONNECT_TIMEOUT)
        return client.last_zxid
    except Exception:  # noqa: BLE001 - whatever stopped it, the probe has no answer; the next may
        return None
    finally:
        close_quietly(client)
