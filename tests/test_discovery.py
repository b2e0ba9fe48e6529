"""The discovery client against a real ZooKeeper and real zkprefork
servers, several on one path: the snapshot follows every change within a
second of ZooKeeper's own (as a plain kazoo watcher sees it), through
signals, the reader's session expiry, a ZooKeeper restart and a wiped
ZooKeeper, and never spuriously shows an empty list."""
import os
import shutil
import signal
import threading
import time

from kazoo.client import KazooClient
from kazoo.recipe.watchers import ChildrenWatch

from support import wait_until
from zkprefork.discovery import Providers

# Seconds the reader may lag a plain kazoo watcher of the same ZooKeeper.
LAG = 1.0


class Recorder:
    """Every snapshot a Providers delivers, with when it came."""

    def __init__(self, providers):
        self.snapshots = []  # (clock, [Provider])
        self.lock = threading.Lock()
        providers.watch(self.add)

    def add(self, snapshot):
        with self.lock:
            self.snapshots.append((time.monotonic(), snapshot))

    def urls(self, index=-1):
        with self.lock:
            return sorted(p.url for p in self.snapshots[index][1]) if self.snapshots else None

    def wait(self, condition, since, timeout=LAG, message='a snapshot'):
        """The first snapshot after index `since` for which condition([Provider]) is true."""
        def found():
            with self.lock:
                return next(([s] for _, s in self.snapshots[since:] if condition(s)), None)
        return wait_until(found, timeout, interval=0.01, message=message)[0]

    def mark(self):
        """An index for wait(): what comes after now."""
        with self.lock:
            return len(self.snapshots)

    def wait_urls(self, urls, since=0, timeout=LAG):
        return self.wait(lambda s: sorted(p.url for p in s) == sorted(urls), since, timeout,
                         message=f'the snapshot {sorted(urls)}, last seen {self.urls()}')

    def check_history(self):
        """Each delivered once (no two equal in a row), no empty one after the first."""
        with self.lock:
            snapshots = [s for _, s in self.snapshots]
        assert all(a != b for a, b in zip(snapshots, snapshots[1:]))
        assert all(snapshot for snapshot in snapshots[1:]), [[p.url for p in s] for s in snapshots]


class Reference:
    """A plain kazoo ChildrenWatch of the path: when ZooKeeper's change is seen."""

    def __init__(self, zk, path):
        zk.ensure_path(path)
        self.seen = []
        ChildrenWatch(zk, path, lambda children: self.seen.append((time.monotonic(), sorted(children))))

    def wait_count(self, count, timeout=15, since=0):
        """When ZooKeeper held `count` children, in what was seen after index `since`."""
        return wait_until(lambda: next((t for t, c in reversed(self.seen[since:]) if len(c) == count), None),
                          timeout, message=f'ZooKeeper to hold {count} children')


def start(servers, ini, hosts, path, options='', node_format='zk', session_timeout=2000):
    config = ini(f'zookeeper = {hosts}\npath = {path}\nhost = 127.0.0.1\nport = 0\n'
                 f'node_format = {node_format}\nsession_timeout = {session_timeout}\n{options}')
    return servers(config)


def url(server):
    return f'http://127.0.0.1:{server.port}'


def test_the_snapshot_follows_start_hup_ttin_sigterm_and_a_killed_master(servers, ini, zookeeper, zk, zk_path):
    reference = Reference(zk, zk_path)
    with Providers(zookeeper.hosts, zk_path) as providers:
        assert providers.wait(5) == []
        recorder = Recorder(providers)
        first, second, third = [start(servers, ini, zookeeper.hosts, zk_path) for _ in range(3)]
        for server in (first, second, third):
            server.wait_serving()
        recorder.wait_urls([url(first), url(second), url(third)], timeout=15)

        count = len(recorder.snapshots)
        first.signal(signal.SIGHUP)  # a reload: the node's generation changes in place
        recorder.wait(lambda s: any(p.data.get('generation') == 1 for p in s), count, timeout=15,
                      message='the reload in the data')
        second.signal(signal.SIGTTIN)
        recorder.wait(lambda s: any(p.data.get('workers') == 2 for p in s), count, timeout=15,
                      message='the new worker count in the data')
        assert len(recorder.snapshots[-1][1]) == 3

        mark = recorder.mark()
        third.signal(signal.SIGTERM)
        gone = reference.wait_count(2)
        recorder.wait_urls([url(first), url(second)], mark, timeout=gone - time.monotonic() + LAG)
        mark = recorder.mark()
        os.kill(first.pid, signal.SIGKILL)
        gone = reference.wait_count(1)
        recorder.wait_urls([url(second)], mark, timeout=gone - time.monotonic() + LAG)
        assert providers.current()[0].data['pid'] == second.pid
        recorder.check_history()
        assert providers.state == 'connected'


def test_a_server_whose_health_check_fails_leaves_the_list_and_comes_back(
        servers, ini, zookeeper, zk, zk_path, tmp_path):
    """The node follows the health check (README "Health check"); so does
    the list, within LAG of ZooKeeper, while the other server stays."""
    flag = tmp_path / 'unhealthy'
    pythonpath = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get('PYTHONPATH')]))
    checked = servers(ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\n'
                          'health_check = /healthz\nhealth_check_interval = 0.2\n'
                          'health_check_rise = 1\nhealth_check_fall = 1\n', app='call:healthapp:factory'),
                      env={'PYTHONPATH': pythonpath, 'HEALTHAPP_FLAG': str(flag)}).wait_serving()
    other = start(servers, ini, zookeeper.hosts, zk_path).wait_serving()
    reference = Reference(zk, zk_path)
    with Providers(zookeeper.hosts, zk_path) as providers:
        recorder = Recorder(providers)
        recorder.wait_urls([url(checked), url(other)], timeout=10)
        reference.wait_count(2)
        mark = recorder.mark()
        flag.write_text('')
        gone = reference.wait_count(1)
        recorder.wait_urls([url(other)], mark, timeout=gone - time.monotonic() + LAG)
        mark, since = recorder.mark(), len(reference.seen)
        flag.unlink()
        back = reference.wait_count(2, since=since)
        recorder.wait_urls([url(checked), url(other)], mark, timeout=back - time.monotonic() + LAG)
        recorder.check_history()


def test_each_snapshot_once_in_order_by_iteration_and_by_watch(zookeeper, zk, zk_path):
    with Providers(zookeeper.hosts, zk_path) as providers:
        assert providers.wait(5) == []
        recorder = Recorder(providers)
        iterated = []
        reader = threading.Thread(target=lambda: iterated.extend(providers), daemon=True)
        reader.start()
        for port in range(8001, 8006):
            zk.create(f'{zk_path}/127.0.0.1:{port}', b'{}', ephemeral=True, makepath=True)
            recorder.wait(lambda s, n=port - 8000: len(s) == n, 0, timeout=5)
    reader.join(5)
    assert not reader.is_alive()  # close() ended the iteration
    lengths = [len(s) for _, s in recorder.snapshots]
    assert lengths == [0, 1, 2, 3, 4, 5]
    assert [len(s) for s in iterated] == lengths


def expire(providers, hosts):
    """ZooKeeper expires the reader's session: another client takes it over and closes it."""
    client = KazooClient(hosts=hosts, client_id=providers._follower._client.client_id)
    client.start(10)
    client.stop()
    client.close()


def test_the_reader_s_session_expires(servers, ini, zookeeper, zk, zk_path):
    first = start(servers, ini, zookeeper.hosts, zk_path).wait_serving()
    with Providers(zookeeper.hosts, zk_path, session_timeout=2000) as providers:
        recorder = Recorder(providers)
        recorder.wait_urls([url(first)], timeout=10)
        old = providers._follower._client.client_id[0]
        expire(providers, zookeeper.hosts)
        wait_until(lambda: providers.state == 'connected'
                   and providers._follower._client.client_id[0] != old, timeout=10,
                   message='a new session')
        # Watched again in the new session: a change is seen.
        second = start(servers, ini, zookeeper.hosts, zk_path).wait_serving()
        recorder.wait_urls([url(first), url(second)], timeout=5)
        recorder.check_history()


def test_a_zookeeper_restart_keeps_the_snapshot(servers, ini, own_zookeeper, zk_path):
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    hosts = ','.join([zookeeper.hosts] * 3)
    first, second = [start(servers, ini, hosts, zk_path, session_timeout=20000) for _ in range(2)]
    for server in (first, second):
        server.wait_serving()
    with Providers(hosts, zk_path, session_timeout=20000) as providers:
        recorder = Recorder(providers)
        recorder.wait_urls([url(first), url(second)], timeout=10)
        states = []
        providers._follower._client.add_listener(states.append)
        zookeeper.stop()
        wait_until(lambda: states, timeout=5, message='the reader to notice')
        assert providers.current()  # the last snapshot stands while disconnected
        zookeeper.start()
        wait_until(lambda: providers.state == 'connected', timeout=15, message='the reader to reconnect')
        assert states == ['SUSPENDED', 'CONNECTED']  # the same session, restored
        mark = recorder.mark()
        second.signal(signal.SIGTERM)
        recorder.wait_urls([url(first)], mark, timeout=10)
        recorder.check_history()


def wipe(zookeeper, providers):
    """Replace `zookeeper` by a new one with a fresh data dir on the same
    port, and wait until `providers` has a session on it."""
    session = providers._follower._client.client_id[0]
    zookeeper.stop()
    shutil.rmtree(os.path.join(zookeeper.directory, 'data'))
    zookeeper.start()
    wait_until(lambda: providers.state == 'connected'
               and providers._follower._client.client_id[0] != session, timeout=10,
               message='a fresh session')


def test_a_wiped_zookeeper_gets_a_fresh_session_and_no_empty_snapshot(servers, ini, own_zookeeper, zk_path):
    zookeeper = own_zookeeper()
    hosts = ','.join([zookeeper.hosts] * 3)
    first, second = [start(servers, ini, hosts, zk_path) for _ in range(2)]
    for server in (first, second):
        server.wait_serving()
    with Providers(hosts, zk_path, session_timeout=2000) as providers:
        recorder = Recorder(providers)
        recorder.wait_urls([url(first), url(second)], timeout=10)
        wipe(zookeeper, providers)
        mark = recorder.mark()
        second.signal(signal.SIGTERM)
        recorder.wait_urls([url(first)], mark, timeout=10)
        recorder.check_history()


def test_the_path_absent_then_created_deleted_and_created_again(zookeeper, zk, zk_path):
    with Providers(zookeeper.hosts, zk_path) as providers:
        assert providers.wait(5) == []
        recorder = Recorder(providers)
        zk.create(f'{zk_path}/127.0.0.1:9001', b'{"pid":1}', makepath=True)
        recorder.wait_urls(['http://127.0.0.1:9001'])
        zk.delete(zk_path, recursive=True)
        recorder.wait_urls([])
        zk.create(f'{zk_path}/[::1]:9002', b'{"scheme":"https"}', makepath=True)
        recorder.wait_urls(['https://[::1]:9002'])
        assert providers.current()[0].host == '::1'


def test_after_a_wipe_the_list_stands_until_its_providers_are_back_or_a_session_timeout(
        own_zookeeper, kazoo_client, zk_path):
    zookeeper = own_zookeeper()
    writer = kazoo_client(zookeeper.hosts)
    for port in (9001, 9002):
        writer.create(f'{zk_path}/127.0.0.1:{port}', b'{"pid":1}', ephemeral=True, makepath=True)
    with Providers(zookeeper.hosts, zk_path, session_timeout=2000) as providers:
        recorder = Recorder(providers)
        recorder.wait_urls(['http://127.0.0.1:9001', 'http://127.0.0.1:9002'], timeout=5)
        wipe(zookeeper, providers)
        mark = recorder.mark()
        # One provider registers again; the reader has read it (it watches its data)...
        kazoo_client(zookeeper.hosts).create(f'{zk_path}/127.0.0.1:9001', b'{"pid":2}', makepath=True,
                                             ephemeral=True)
        wait_until(lambda: f'{zk_path}/127.0.0.1:9001' in providers._follower._client._data_watchers,
                   timeout=5, message='the reader to read the new node')
        # ...but the list stands until the other is back, or a session timeout has passed.
        assert recorder.mark() == mark
        recorder.wait_urls(['http://127.0.0.1:9001'], mark, timeout=2.0 + LAG + 1.0)
        assert providers.current()[0].data == {'pid': 2}
        recorder.check_history()
