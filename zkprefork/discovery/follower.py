"""Following one service path: a ZooKeeper session that survives what the
server's registrar survives, and a snapshot of the providers after every
change.

One thread, the follower's, makes every request; kazoo's state listener,
its watches and the zxid probe only post news to it (a listener that
blocks deadlocks kazoo's connection thread).
"""
import logging
import queue
import threading

from kazoo.client import KazooClient, KazooState, KeeperState
from kazoo.exceptions import KazooException, NoAuthError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from zkprefork import clock
from zkprefork.discovery.provider import read_providers
from zkprefork.errors import ConfigError
from zkprefork.registrar import security as zksecurity
from zkprefork.registrar import session as zksession
from zkprefork.registrar.protocol import RegistrarConfig
from zkprefork.settings import make_settings

log = logging.getLogger('zkprefork.discovery')

# The server's options a reader takes too, with the same names and checks.
OPTIONS = ('session_timeout', 'zookeeper_credentials_file', 'zookeeper_credentials_env', 'zookeeper_auth',
           'zookeeper_ca_file', 'zookeeper_cert_file', 'zookeeper_key_file', 'zookeeper_check_hostname')
RETRY_READ = 0.5  # seconds before reading again after a request failed while connected


def configure(zookeeper, path, node_format, options):
    """(RegistrarConfig, Credentials or None) from the server's option
    values (strings, or values whose str() is one: True, 1000, a Path),
    checked by the server's own checks. Raises ConfigError (one line, the
    option first), TypeError for an option a reader does not take."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f'unknown option {unknown[0]!r} (a reader takes {", ".join(OPTIONS)})')
    if not zookeeper:
        raise ConfigError('zookeeper: required (HOST:PORT[,HOST:PORT...][/chroot])')
    raw = {'zookeeper': zookeeper, 'path': path, 'node_format': node_format, **options}
    settings = make_settings({name: str(value) for name, value in raw.items() if value is not None})
    config = RegistrarConfig.from_settings(settings)
    try:
        credentials = zksecurity.read_credentials(config.credentials)
    except (OSError, ValueError) as error:
        option = 'zookeeper_credentials_file' if config.credentials.file else 'zookeeper_credentials_env'
        raise ConfigError(f'{option}: {error}') from None
    return config, credentials


class Follower:
    """Reads the providers under `config.service_path` whenever ZooKeeper
    says they changed, and calls `publish(snapshot)` (on its thread) with
    each snapshot that differs from the last; `fail(message)` once for a
    problem that retrying cannot fix (then it stops).

    `state`: 'connecting', 'connected', 'suspended' (connection lost, the
    session may live: the last snapshot stands), 'lost' (the session
    expired; kazoo seeks a new one, and the follower reads again in it) or
    'failed'.
    """

    def __init__(self, config, credentials, publish, fail):
        self.config = config
        self.credentials = credentials
        self.publish = publish
        self.fail = fail
        self.state = 'connecting'
        self.op_timeout = max(config.session_timeout / 1000.0, 2.0)
        self._options = zksecurity.client_options(config.tls, credentials)
        self._events = queue.SimpleQueue()
        self._timers = {}  # 'probe' or 'read' -> when (clock.now())
        self._dirty = False  # ZooKeeper said something changed since the last read
        self._last = None  # the last snapshot published
        self._held = None  # (urls, until): the last snapshot stands, in a new session
        self._session_ended = False  # since the last CONNECTED
        self._generation = 0
        self._client = self._had_session = self._watch = None
        self._thread = threading.Thread(target=self._run, name='zkprefork-discovery', daemon=True)

    def start(self):
        missing = zksecurity.missing_support(self.credentials)
        if missing:
            raise ConfigError(missing)
        self._new_client()
        self._thread.start()

    def stop(self):
        self._events.put(('stop', None))
        if self._thread.is_alive():
            self._thread.join()
        if self._client:
            zksession.close_quietly(self._client)
            self._client = None

    def _new_client(self):
        self._generation += 1
        self._had_session = False
        generation = self._generation
        client = KazooClient(
            hosts=zksession.kazoo_hosts(self.config), randomize_hosts=False,
            timeout=self.config.session_timeout / 1000.0,
            connection_retry=KazooRetry(max_tries=-1, max_delay=zksession.RECONNECT_MAX_DELAY),
            **self._options)
        client.add_listener(lambda state: self._events.put(
            ('state', generation, state, client.client_state)))
        # One function per client: kazoo keeps a set of them per path, so
        # reading again does not pile up watches.
        self._watch = lambda event: self._events.put(('changed', generation))
        self._client = client
        client.start_async()

    # -- the thread ------------------------------------------------------

    def _run(self):
        while True:
            event = self._next_event()
            batch = [event] if event else []
            while not self._events.empty():  # a burst is read once
                batch.append(self._events.get())
            if any(item[0] == 'stop' for item in batch):
                return
            for kind, generation, *value in batch:
                if generation == self._generation:
                    getattr(self, f'_on_{kind}')(*value)
            self._run_timers()
            if self._dirty and self.state == 'connected':
                self._read()

    def _next_event(self):
        wait = min(self._timers.values(), default=None)
        try:
            return self._events.get(timeout=None if wait is None else max(0.0, wait - clock.now()))
        except queue.Empty:
            return None

    def _run_timers(self):
        now = clock.now()
        for name, when in list(self._timers.items()):
            if when <= now:
                del self._timers[name]
                if name == 'probe':
                    self._probe()
                else:
                    self._dirty = True

    def _on_state(self, state, keeper_state):
        if state == KazooState.CONNECTED:
            # kazoo dropped every watch when the connection went: read again.
            self.state, self._had_session, self._dirty = 'connected', True, True
            self._timers.pop('probe', None)
            if self._session_ended and self._last:
                self._hold()
            self._session_ended = False
            return
        if state == KazooState.LOST and keeper_state == KeeperState.AUTH_FAILED:
            identity = self.credentials.identity if self.credentials else 'an anonymous client'
            return self._fail(f'ZooKeeper rejected the credentials of {identity} (authentication failed)')
        self.state = 'lost' if state == KazooState.LOST else 'suspended'
        self._session_ended = self._session_ended or state == KazooState.LOST
        if self._had_session:
            self._timers.setdefault('probe', clock.now() + zksession.PROBE_AFTER)

    def _on_changed(self):
        self._dirty = True

    def _probe(self):
        # The registrar's test for a ZooKeeper that lost its data: it refuses
        # our session for ever, and kazoo would keep offering it.
        if self.state == 'connected' or not self._had_session:
            return
        generation = self._generation
        threading.Thread(target=lambda: self._events.put((
            'zxid', generation, zksession.server_zxid(self.config.hosts, self._options))),
            daemon=True).start()

    def _on_zxid(self, zxid):
        if self.state == 'connected':
            return
        if zxid is None or zxid >= self._client.last_zxid:
            self._timers['probe'] = clock.now() + zksession.PROBE_EVERY
            return
        log.warning('ZooKeeper refuses our session (it is at zxid 0x%x, the session saw 0x%x): '
                    'starting a new session', zxid, self._client.last_zxid)
        old = self._client
        self._new_client()
        self.state, self._session_ended = 'connecting', True
        self._timers.pop('probe', None)
        threading.Thread(target=zksession.close_quietly, args=(old,), daemon=True).start()

    def _hold(self):
        # A new session: ours expired or was refused, and so, likely, were
        # the providers' (a ZooKeeper that lost its data, a long partition).
        # They register again in their own new sessions, one by one: until
        # all have, or for one session timeout (what ZooKeeper gives a
        # silent server), the last snapshot stands rather than a partial one.
        self._held = ({provider.url for provider in self._last}, clock.now() + self.op_timeout)

    def _read(self):
        self._dirty = False
        try:
            snapshot = read_providers(self._client, self.config.service_path, self.config.node_format,
                                      self._watch, self.op_timeout)
        except NoAuthError:
            who = self.credentials.identity if self.credentials else 'an anonymous client'
            return self._fail(f'ZooKeeper refused {who} to read {self.config.service_path} (NoAuth)')
        except (KazooException, KazooTimeoutError):
            # Connection loss says so to the listener; a timeout does not.
            self._dirty = True
            self._timers['read'] = clock.now() + RETRY_READ
            return
        self._deliver(snapshot)

    def _deliver(self, snapshot):
        if self._held:
            urls, until = self._held
            if clock.now() < until and not urls <= {p.url for p in snapshot}:
                self._timers['read'] = until
                return
            self._held = None
        if snapshot != self._last:
            self._last = snapshot
            self.publish(snapshot)

    def _fail(self, message):
        self.state = 'failed'
        self._timers.clear()
        self._generation += 1  # nothing more from this client, which stop() closes
        self.fail(message)
