"""The registrar's inbox: what every thread (kazoo's, the checks', the
stdin reader's, a signal handler) hands the loop, as (kind, value) pairs.

The kinds are the constants below, checked where they are posted: a kind
nobody handles is a programming error, raised at the poster (its thread's
traceback names it), not a message the loop drops without a word.
"""
import queue

# kind -> value
STATE = 'state'  # kazoo's news: (client generation, KazooState, KeeperState, client_id)
ZXID = 'zxid'  # a probe's answer: (client generation, ZooKeeper's last zxid or None)
TLS = 'tls'  # the TLS check: a problem (one line) or None
HEALTH = 'health'  # the health check: (passed, detail)
WATCH = 'watch'  # a watched node changed: kazoo's WatchedEvent
COMMAND = 'command'  # from the master: a registrar.protocol command
TICK = 'tick'  # a timer is due (made by Inbox.next, never posted)
STOP = 'stop'  # SIGTERM: None
END = 'end'  # the master is not heard any more (end of file on stdin): None
KINDS = frozenset({STATE, ZXID, TLS, HEALTH, WATCH, COMMAND, STOP, END})


class UnknownKind(ValueError):
    """Posted with a kind not in KINDS."""


class Inbox:
    """A queue of (kind, value); `post` is safe from any thread and from a
    signal handler (SimpleQueue.put is reentrant)."""

    def __init__(self):
        self._queue = queue.SimpleQueue()

    def post(self, kind, value):
        """Raises UnknownKind for a kind not in KINDS."""
        if kind not in KINDS:
            raise UnknownKind(f'the registrar has no inbox kind {kind!r}')
        self._queue.put((kind, value))

    def next(self, timeout):
        """The oldest (kind, value), waiting up to `timeout` seconds (None:
        for ever); (TICK, None) if nothing came in that time."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return TICK, None
