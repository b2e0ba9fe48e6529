"""A provider as a reader sees it, how a snapshot of them is read, and
which one a client that wants one address should try next."""
import threading
import typing

from kazoo.exceptions import NoNodeError

from zkprefork import clock, nodeformat
from zkprefork.addresses import format_address

# Seconds a provider reported by `refused()` is skipped by `choose()`, on
# the monotonic clock: long enough for a server that is stopping to have
# deleted its node (zkprefork deletes it before it closes its port), short
# enough that a provider that merely hiccuped is soon tried again.
QUARANTINE = 10.0


class NoProviders(LookupError):
    """choose() was asked for a provider while there is none."""


class Provider(typing.NamedTuple):
    """One live provider: `name` is its node's name under the path, `host`
    and `port` where it serves, `scheme` 'http' or 'https', `data` its
    node's JSON object as the writer wrote it ({} if none; shared between
    snapshots: do not modify it)."""
    name: str
    host: str
    port: int
    scheme: str
    data: dict

    @property
    def url(self):
        """'scheme://host:port', an IPv6 host in brackets (RFC 3986)."""
        return f'{self.scheme}://{format_address(self.host, self.port)}'

    def as_json(self):
        return {'name': self.name, 'host': self.host, 'port': self.port, 'scheme': self.scheme,
                'url': self.url, 'data': self.data}


def read_providers(client, path, node_format, watch, timeout):
    """The live providers under `path` (full, chroot included), sorted by
    name: [] if the path does not exist. Every request sets `watch` (a
    kazoo watch function): on the path's children, or on its creation,
    and on each child's data, so that any change calls it. Raises what
    kazoo raises, or KazooTimeoutError after `timeout` s for one request."""
    try:
        children = client.get_children_async(path, watch=watch).get(timeout=timeout)
    except NoNodeError:
        if client.exists_async(path, watch=watch).get(timeout=timeout) is None:
            return []
        children = client.get_children_async(path, watch=watch).get(timeout=timeout)
    # All at once: one round trip, not one per child.
    pending = [(name, client.get_async(f'{path.rstrip("/")}/{name}', watch=watch)) for name in children]
    providers = []
    for name, result in sorted(pending):
        try:
            raw, _ = result.get(timeout=timeout)
        except NoNodeError:
            continue  # gone since it was listed: the children watch says so
        found = nodeformat.read_advertised(node_format, name, raw)
        if found:
            providers.append(Provider(name, *found))
    return providers


class RoundRobin:
    """Each call of choose() the next provider of a snapshot, skipping those
    refused in the last `quarantine` seconds; thread-safe."""

    def __init__(self, quarantine=QUARANTINE):
        self.quarantine = quarantine
        self._refused = {}  # url -> when (clock.now())
        self._next = 0
        self._lock = threading.Lock()

    def refused(self, provider):
        """`provider` (a Provider, or its url) refused a connection just now."""
        with self._lock:
            self._refused[getattr(provider, 'url', provider)] = clock.now()

    def choose(self, providers):
        """The next of `providers` not refused recently; if all were, the
        one refused longest ago (better than none). Raises NoProviders."""
        if not providers:
            raise NoProviders('no provider is registered')
        with self._lock:
            now = clock.now()
            self._refused = {url: at for url, at in self._refused.items() if now - at < self.quarantine}
            for offset in range(len(providers)):
                index = (self._next + offset) % len(providers)
                if providers[index].url not in self._refused:
                    self._next = index + 1
                    return providers[index]
            return min(providers, key=lambda provider: self._refused[provider.url])
