"""The registrar's ZooKeeper session: one KazooClient, its states, the TLS
check, and the failures that retrying cannot fix.

Everything here runs in the registrar's loop, except kazoo's state listener
and the TLS check's thread, which only pass news on with `post(kind, value)`.
"""
import logging
import math
import threading
import time

from kazoo.client import KazooClient, KazooState, KeeperState
from kazoo.exceptions import KazooException, NoNodeError, RolledBackError
from kazoo.retry import KazooRetry

from zkprefork.registrar import security as zksecurity

log = logging.getLogger('zkprefork.registrar')

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
        self.password = None  # of the session, while there is one
        resume = config.resume and (config.resume[0], bytes.fromhex(config.resume[1]))
        self._new_client(resume)

    def _new_client(self, client_id=None):
        self.clients += 1
        self.had_session = False
        generation = self.clients
        client = KazooClient(
            hosts=kazoo_hosts(self.config),
            timeout=self.config.session_timeout / 1000.0,
            connection_retry=KazooRetry(max_tries=-1, max_delay=RECONNECT_MAX_DELAY),
            client_id=client_id,
            **zksecurity.client_options(self.config.tls, self.identity))
        # Listeners run on kazoo's connection thread and must not block: they
        # only pass the news (read there, while it is still true) on.
        client.add_listener(lambda state: self.post(
            'state', (generation, state, client.client_state, client.client_id)))
        self.client = client

    @property
    def connected(self):
        return self.state == 'connected'

    def start(self):
        """Connect whenever ZooKeeper answers. Returns a problem (one line)
        if connecting cannot even be tried, else None."""
        missing = zksecurity.missing_support(self.identity)
        if missing:
            return missing
        self.client.start_async()
        self.running = True
        if self.config.tls:
            self.timers.at(TLS_CHECK_AFTER, self.check_tls)
        return None

    def stop(self):
        self.running = False
        self.timers.cancel(self.check_tls)
        try:
            self.client.stop()
        except KazooException as error:
            log.warning('stopping the ZooKeeper client: %r', error)

    def close(self):
        """End the session: ZooKeeper deletes its ephemeral nodes at once."""
        _close_quietly(self.client)

    def renew(self):
        """Give up the session for a new one, with a new client: kazoo keeps
        offering the old session, and the last zxid it saw, for ever, and a
        ZooKeeper that lost its data refuses both ("client has seen zxid
        ..."). A node the old session may still hold is found as stale and
        taken over."""
        old = self.client
        self._new_client()
        self.id = self.password = None
        self.state = 'connecting'
        if self.running:
            self.client.start_async()
        # Stopping a client that is not connected may wait for its
        # connection thread: not in the loop.
        threading.Thread(target=_close_quietly, args=(old,), daemon=True).start()

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
        return None

    def check_tls(self):
        # On a thread of its own: a host that drops packets would otherwise
        # keep the loop (and the master's commands) waiting.
        if not self.connected and self.running:
            threading.Thread(target=lambda: self.post(
                'tls', zksecurity.tls_problem(self.config.addresses, self.config.tls)),
                daemon=True).start()

    def on_tls_checked(self, problem):
        """The check's result, in the loop. Returns a failed handshake as a
        problem that retrying cannot fix, or None."""
        if self.connected or not self.running:
            return None
        if problem:
            return f'TLS handshake with ZooKeeper failed: {problem}'
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


def _close_quietly(client):
    try:
        client.stop()
        client.close()
    except KazooException as error:
        log.warning('closing the ZooKeeper session: %r', error)


def kazoo_hosts(config):
    """The hosts string for kazoo: the servers named as often as it takes
    for kazoo's connect timeout (session timeout / number of hosts) to be
    CONNECT_TIMEOUT at most, so that several attempts fit in a session."""
    attempts = math.ceil(config.session_timeout / 1000.0 / CONNECT_TIMEOUT / len(config.addresses))
    return ','.join([config.hosts] * max(1, attempts))
