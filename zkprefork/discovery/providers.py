"""The providers registered under one path, kept up to date."""
import logging
import queue
import threading

from zkprefork.discovery.follower import Follower, configure
from zkprefork.discovery.provider import QUARANTINE, RoundRobin
from zkprefork.registrar import security as zksecurity

log = logging.getLogger('zkprefork.discovery')
_END = object()


class DiscoveryError(Exception):
    """A problem that retrying cannot fix (rejected credentials, a path we
    may not read), in one line."""


class _Failure(str):
    pass


class Providers:
    """The live providers that servers registered under `path` in the node
    format `node_format` ('zk', 'serverset' or 'curator': see README "Node
    formats"), zkprefork's or another writer's (Curator's ServiceDiscovery,
    Finagle's or Aurora's ServerSet announcers, zc.zk).

    `zookeeper` is the server's connection string (HOST:PORT[,...][/chroot]);
    `options` are the server's: session_timeout (ms), zookeeper_credentials_file
    or zookeeper_credentials_env, zookeeper_auth, zookeeper_ca_file,
    zookeeper_cert_file, zookeeper_key_file, zookeeper_check_hostname,
    checked as the server checks them (ConfigError, one line, the option
    first). `quarantine`: seconds choose() skips a provider reported by refused().

    Use it as a context manager (or start() and close()). A snapshot is a
    list of Provider sorted by name. What it follows through: a path that
    does not exist yet (the snapshot is [] until it does), a connection lost
    (the last snapshot stands while the session may live), an expired
    session (read again in the new one), a ZooKeeper that lost its data (a
    fresh session; the last snapshot stands until its providers have
    registered again, or for one session timeout), the path deleted and
    created again.
    """

    def __init__(self, zookeeper, path, node_format='zk', *, quarantine=QUARANTINE, **options):
        config, credentials = configure(zookeeper, path, node_format, options)
        if credentials:
            zksecurity.redact_logs(credentials)  # kazoo logs them at DEBUG
        self.config = config
        self._follower = Follower(config, credentials, self._publish, self._fail)
        self._round_robin = RoundRobin(quarantine)
        self._changed = threading.Condition()
        self._snapshot = None  # until the first read
        self._failure = None
        self._closed = False
        self._inboxes = []

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def start(self):
        """Connect whenever ZooKeeper answers, and follow the path."""
        self._follower.start()

    def close(self):
        """Stop following and end the session; iterations end, watches stop."""
        self._follower.stop()
        self._put(_END, closed=True)

    @property
    def state(self):
        """'connecting', 'connected', 'suspended', 'lost' or 'failed' (Follower)."""
        return self._follower.state

    def current(self):
        """The last snapshot ZooKeeper gave ([] before the first)."""
        with self._changed:
            return list(self._snapshot or ())

    def wait(self, timeout=None):
        """The current snapshot once there is one (the first read done).
        Raises TimeoutError after `timeout` s, DiscoveryError on a failure."""
        with self._changed:
            self._changed.wait_for(lambda: self._snapshot is not None or self._failure or self._closed,
                                   timeout)
            if self._failure:
                raise DiscoveryError(self._failure)
            if self._snapshot is None:
                raise TimeoutError(f'no answer from ZooKeeper at {self.config.hosts} within {timeout} s')
            return list(self._snapshot)

    def __iter__(self):
        """Every snapshot, the current one first, each once and in order,
        until close() (blocking in between). Raises DiscoveryError on a failure."""
        inbox = self._subscribe()
        try:
            yield from self._snapshots(inbox)
        finally:
            self._unsubscribe(inbox)

    def watch(self, callback):
        """Call `callback(snapshot)` with every snapshot, as iterating does,
        on a thread of its own (a slow callback delays only itself), until
        close(). An exception it raises is logged, and the next snapshot
        still delivered."""
        inbox = self._subscribe()
        threading.Thread(target=self._dispatch, args=(inbox, callback), daemon=True,
                         name='zkprefork-discovery-watch').start()

    def choose(self):
        """One provider, round robin over the current snapshot, skipping
        those refused in the last `quarantine` seconds (if all were, the one
        refused longest ago). Raises NoProviders when there is none."""
        return self._round_robin.choose(self.current())

    def refused(self, provider):
        """Report that `provider` (a Provider or its url) refused a
        connection: choose() skips it for `quarantine` seconds."""
        self._round_robin.refused(provider)

    # -- delivery ----------------------------------------------------------

    def _publish(self, snapshot):
        # One hold of the (reentrant) lock: a subscriber that comes between
        # would get this snapshot twice.
        with self._changed:
            self._snapshot = tuple(snapshot)
            self._put(self._snapshot)

    def _fail(self, message):
        log.error('%s; not retrying', message)
        with self._changed:
            self._failure = message
            self._put(_Failure(message))

    def _put(self, item, closed=False):
        with self._changed:
            self._closed = self._closed or closed
            for inbox in self._inboxes:
                inbox.put(item)
            self._changed.notify_all()

    def _subscribe(self):
        inbox = queue.SimpleQueue()
        # Under the lock, so that no snapshot is missed or seen twice.
        with self._changed:
            for item, present in ((self._snapshot, self._snapshot is not None),
                                  (_Failure(self._failure or ''), self._failure), (_END, self._closed)):
                if present:
                    inbox.put(item)
            self._inboxes.append(inbox)
        return inbox

    def _unsubscribe(self, inbox):
        with self._changed:
            self._inboxes.remove(inbox)

    def _dispatch(self, inbox, callback):
        try:
            for snapshot in self._snapshots(inbox):
                try:
                    callback(snapshot)
                except Exception:  # noqa: BLE001 - the watcher's bug must not end the watch
                    log.exception('the callback %r failed', callback)
        except DiscoveryError:
            pass  # logged by _fail
        finally:
            self._unsubscribe(inbox)

    @staticmethod
    def _snapshots(inbox):
        while (item := inbox.get()) is not _END:
            if isinstance(item, _Failure):
                raise DiscoveryError(item)
            yield list(item)
