"""The registrar process: the only owner of a ZooKeeper session.

It is started by the master (``python -m zkprefork.registrar``, a fresh
interpreter: kazoo is not fork-safe and must never be shared) and never
forks. It reads JSON commands, one per line, on stdin and writes JSON events
on stdout. End of file on stdin means the master is gone or done: the
registrar then closes the session, which deletes its ephemeral nodes at once
(not after the session timeout), and exits.

Commands: {"op": "register", "endpoints": [[host, port], ...], "data": {...}}
and {"op": "unregister"}.
Events: {"event": "registered", "nodes": [...]}, {"event": "unregistered"},
{"event": "state", "state": ...}.
"""
import json
import logging
import os
import queue
import signal
import sys
import threading

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError
from kazoo.retry import KazooRetry
from kazoo.security import READ_ACL_UNSAFE

from zkprefork import logsetup, nodeformat, proctitle

log = logging.getLogger('zkprefork.registrar')

RECONNECT_MAX_DELAY = 2.0  # seconds; kazoo's own cap would be an hour


class Registrar:

    def __init__(self, config, events_out):
        self.path = config['path']
        self.master_pid = config['master_pid']
        self.out = events_out
        self.inbox = queue.Queue()
        self.wanted = {}  # node path -> data (bytes)
        self.client = KazooClient(
            hosts=config['zookeeper'],
            timeout=config['session_timeout'] / 1000.0,
            connection_retry=KazooRetry(max_tries=-1, max_delay=RECONNECT_MAX_DELAY),
            command_retry=KazooRetry(max_tries=5, max_delay=RECONNECT_MAX_DELAY),
        )
        # Listeners run on kazoo's connection thread and must not block:
        # they only pass the news on to the main loop.
        self.client.add_listener(lambda state: self.inbox.put(('state', state)))

    def run(self):
        threading.Thread(target=self._read_commands, daemon=True).start()
        self.client.start_async()
        while True:
            kind, value = self.inbox.get()
            if kind == 'stop':
                break
            self._handle(kind, value)
        self._close_session()

    def _read_commands(self):
        for line in sys.stdin:
            self.inbox.put(('command', json.loads(line)))
        self.inbox.put(('stop', None))

    def _handle(self, kind, value):
        if kind == 'state':
            self._emit(event='state', state=str(value))
            log.info('ZooKeeper connection %s', value)
            if value == KazooState.CONNECTED:
                self.inbox.put(('ensure', None))
        elif kind == 'ensure':
            self._ensure()
        elif value['op'] == 'register':
            self.wanted = {self._node(name): json.dumps(data, separators=(',', ':')).encode()
                           for name, data in nodeformat.zk_nodes(value['endpoints'], value['data'])}
            self._ensure()
        elif value['op'] == 'unregister':
            self._unregister()

    def _node(self, name):
        return self.path.rstrip('/') + '/' + name

    def _emit(self, **event):
        self.out.write(json.dumps(event) + '\n')
        self.out.flush()

    def _connected(self):
        return self.client.state == KazooState.CONNECTED

    def _ensure(self):
        """Make every wanted node exist, owned by this session, with our data."""
        if not self.wanted or not self._connected():
            return
        try:
            self.client.retry(self.client.ensure_path, self.path)
            registered = [node for node, data in self.wanted.items() if self._ensure_node(node, data)]
        except KazooException as error:
            log.error('registration in ZooKeeper failed, will retry on reconnect: %r', error)
            return
        if registered:
            self._emit(event='registered', nodes=registered)

    def _ensure_node(self, node, data):
        try:
            self.client.create(node, data, acl=READ_ACL_UNSAFE, ephemeral=True)
            log.info('registered %s %s', node, data.decode())
        except NodeExistsError:
            if not self._adopt(node, data):
                return False
        # Someone deleting our node must not go unnoticed.
        self.client.exists(node, watch=lambda event: self.inbox.put(('ensure', None)))
        return True

    def _adopt(self, node, data):
        """The name is taken: keep it if it is ours, take it over if an
        earlier session of this same master left it, else leave it alone."""
        try:
            current, stat = self.client.get(node)
        except NoNodeError:
            self.inbox.put(('ensure', None))
            return False
        session_id = self.client.client_id[0]
        if stat.ephemeralOwner == session_id and current == data:
            return True
        if stat.ephemeralOwner == 0:
            log.error('cannot register %s: a persistent node of that name exists', node)
            return False
        if stat.ephemeralOwner != session_id and _pid_of(current) != self.master_pid:
            log.error('cannot register %s: it belongs to another live server (%s)',
                      node, current.decode(errors='replace'))
            self.client.exists(node, watch=lambda event: self.inbox.put(('ensure', None)))
            return False
        # Delete and create in one transaction: never a moment without a node.
        transaction = self.client.transaction()
        transaction.delete(node, version=stat.version)
        transaction.create(node, data, acl=READ_ACL_UNSAFE, ephemeral=True)
        results = transaction.commit()
        failed = [result for result in results if isinstance(result, Exception)]
        if failed:
            log.error('cannot take over %s: %r', node, failed[0])
            return False
        log.info('registered %s %s (took over an earlier session\'s node)', node, data.decode())
        return True

    def _unregister(self):
        nodes, self.wanted = list(self.wanted), {}
        if self._connected():
            for node in nodes:
                try:
                    self.client.delete(node)
                    log.info('unregistered %s', node)
                except NoNodeError:
                    pass
                except KazooException as error:
                    log.error('could not delete %s: %r (it goes with the session)', node, error)
        self._emit(event='unregistered')

    def _close_session(self):
        try:
            self.client.stop()
            self.client.close()
        except KazooException as error:
            log.warning('closing the ZooKeeper session: %r', error)


def _pid_of(data):
    try:
        return json.loads(data).get('pid')
    except (ValueError, AttributeError):
        return None


def main():
    # The master orders the shutdown; Ctrl-C reaching the whole process
    # group must not kill the session before the node is deleted.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = json.loads(sys.stdin.readline())
    logsetup.configure(config.get('loggers'))
    proctitle.set(f'registrar {config["path"]}')
    registrar = Registrar(config, sys.stdout)
    signal.signal(signal.SIGTERM, lambda signum, frame: registrar.inbox.put(('stop', None)))
    registrar.run()
    log.info('ZooKeeper session closed (pid %d)', os.getpid())


if __name__ == '__main__':
    main()
