"""The registrar under faults, against real processes and a real ZooKeeper:
its master killed while ZooKeeper is down, ZooKeeper down for longer than
the session timeout, and what it tells of its ZooKeeper hosts and health
check (the order it tries the hosts in, IPv6 addresses in its log).

Imports only the tests' support (no zkprefork internals), so that the same
file runs against an older tree, with that tree first on PYTHONPATH."""
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from kazoo.recipe.watchers import ChildrenWatch

from support import Background, free_port, registrar_of, wait_until

pytestmark = pytest.mark.timeout(120)

# The registrar's reconnection back-off at most (2 s, +40% jitter), plus one
# connection attempt that a starting ZooKeeper leaves unanswered (2 s), plus
# a second: how soon after ZooKeeper serves again the registrar reaches it.
REACHED_WITHIN = 2.0 * 1.4 + 2.0 + 1.0


def registered_server(servers, ini, hosts, path, options=''):
    config = ini(f'zookeeper = {hosts}\npath = {path}\nhost = 127.0.0.1\n{options}')
    return servers(config).wait_serving()


def gone(process):
    """Whether a psutil.Process has exited (a zombie counts: nothing runs)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def seconds_until_gone(zookeeper, kazoo_client, node):
    """Start `zookeeper` again; the seconds until `node` is gone, read by a
    reader of its own (on a loaded machine a reader from before the outage
    may lose its session, and whether the node is there does not depend on it)."""
    zookeeper.start()
    returned = time.monotonic()
    fresh = kazoo_client(zookeeper.hosts, timeout=20)
    wait_until(lambda: not fresh.exists(node), timeout=20 + 5, interval=0.05, message='the node to go')
    return time.monotonic() - returned


def test_master_killed_while_zookeeper_is_down(servers, ini, own_zookeeper, kazoo_client, zk_path):
    """SIGKILL the master during an outage, with a health check on (its
    checks fail once the workers are gone): when ZooKeeper returns, the
    registrar closes its session (the node goes at once, not a session
    timeout later) and exits."""
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    server = registered_server(servers, ini, zookeeper.hosts, zk_path,
                               'session_timeout = 20000\nhealth_check = /healthz\n'
                               'health_check_interval = 0.2\nhealth_check_rise = 1\n'
                               'health_check_fall = 2\n')
    node = f'{zk_path}/127.0.0.1:{server.port}'
    zk = kazoo_client(zookeeper.hosts, timeout=20)
    wait_until(lambda: zk.exists(node), message='the node')
    zk.stop()  # no reader is left reconnecting through the outage (seconds_until_gone has its own)
    registrar = registrar_of(server)
    zookeeper.stop()
    server.wait_for_log('ZooKeeper suspended')
    os.kill(server.pid, signal.SIGKILL)  # the master alone: its registrar and workers are left
    server.process.wait(10)
    time.sleep(2.0)  # checks fail, and every state line would go to a dead master
    waiting = not gone(registrar)
    took = seconds_until_gone(zookeeper, kazoo_client, node)
    assert took < REACHED_WITHIN, f'the node went {took:.1f} s after ZooKeeper returned (session: 20 s)'
    assert waiting, 'the registrar exited before ZooKeeper came back'
    wait_until(lambda: gone(registrar), timeout=5, message='the registrar to exit')
    assert 'BrokenPipeError' not in server.log()


def test_zookeeper_down_longer_than_the_session_timeout_keeps_the_session(
        servers, ini, own_zookeeper, kazoo_client, zk_path):
    """ZooKeeper stopped for longer than the session timeout, restarted with
    its data: it restores the session, and the registrar takes it back
    rather than starting a new one. The ServerSet member keeps its name,
    czxid and owner, and a reader watching the children never sees it go."""
    session_timeout = 6.0
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    server = registered_server(servers, ini, zookeeper.hosts, zk_path,
                               f'session_timeout = {int(session_timeout * 1000)}\n'
                               'node_format = serverset\n')
    zk = kazoo_client(zookeeper.hosts, timeout=20)  # a reader whose session outlives the outage
    [member] = wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the member')
    before = zk.exists(f'{zk_path}/{member}')
    seen = []
    ChildrenWatch(zk, zk_path, lambda children: seen.append(sorted(children)))
    connections = server.log().count('ZooKeeper connected')
    zookeeper.stop()
    time.sleep(session_timeout + 2.0)
    zookeeper.start()
    wait_until(lambda: server.log().count('ZooKeeper connected') > connections,
               timeout=REACHED_WITHIN + 2, message='the registrar to reconnect')
    time.sleep(1.0)  # time for a takeover, were there one
    # A fresh reader: on a loaded machine the watching reader's own session
    # may not come back, and what the node is does not depend on it.
    fresh = kazoo_client(zookeeper.hosts, timeout=20)
    after = fresh.exists(f'{zk_path}/{member}')
    assert after is not None, f'{member} is gone: {fresh.get_children(zk_path)}'
    assert (after.czxid, after.ephemeralOwner) == (before.czxid, before.ephemeralOwner)
    assert fresh.get_children(zk_path) == [member]
    assert seen and all(member in children for children in seen), seen
    assert 'starting a new session' not in server.log()


class LoneRegistrar:
    """A registrar started as its master starts it (``python -m
    zkprefork.registrar``, the configuration line first), with this test as
    its master; killed by pid at the end if still running."""

    def __init__(self, directory, zookeeper, path, session_timeout):
        config = {'hosts': zookeeper.hosts, 'addresses': [['127.0.0.1', zookeeper.port]], 'chroot': '',
                  'path': path, 'session_timeout': session_timeout, 'node_format': 'zk',
                  'properties': [], 'loggers': None, 'credentials': None, 'tls': None, 'health': None}
        self.log_path = os.path.join(directory, f'registrar-{time.monotonic_ns()}.log')
        with open(self.log_path, 'wb') as log:
            self.process = subprocess.Popen([sys.executable, '-m', 'zkprefork.registrar'],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            start_new_session=True)
        self.send(config)

    def send(self, message):
        self.process.stdin.write((json.dumps(message) + '\n').encode())
        self.process.stdin.flush()

    def register(self, *ports):
        self.send({'op': 'register', 'endpoints': [['127.0.0.1', port] for port in ports],
                   'data': {'pid': os.getpid(), 'instance': 'test', 'workers': 1, 'generation': 0}})

    def wait_registered(self, count):
        for line in self.process.stdout:
            event = json.loads(line)
            if event['event'] == 'state' and len(event['nodes']) == count:
                return event['nodes']
        raise AssertionError(f'the registrar exited:\n{self.log()}')

    def log(self):
        with open(self.log_path, encoding='utf-8', errors='replace') as file:
            return file.read()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # its reader is gone


@pytest.fixture
def lone_registrar(tmp_path):
    started = []

    def start(*args):
        started.append(LoneRegistrar(str(tmp_path), *args))
        return started[-1]
    yield start
    for registrar in started:
        registrar.kill()


def test_a_master_that_stops_reading_gets_the_session_closed(own_zookeeper, kazoo_client, zk_path,
                                                             lone_registrar):
    """The master's end of the registrar's output closes (its stdin stays
    open): the next event is a broken pipe, and the registrar closes its
    session on the way out; its nodes go at once."""
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    zk = kazoo_client(zookeeper.hosts)
    registrar = lone_registrar(zookeeper, zk_path, 20000)
    registrar.register(free_port())
    [first] = registrar.wait_registered(1)
    registrar.process.stdout.close()
    second = free_port()
    registrar.register(int(first.rpartition(':')[2]), second)  # a second node: news to tell
    told = time.monotonic()
    wait_until(lambda: not zk.get_children(zk_path), timeout=20 + 5, interval=0.05,
               message='the nodes to go')
    took = time.monotonic() - told
    assert f'registered {zk_path}/127.0.0.1:{second}' in registrar.log()
    assert took < 2.0, f'the nodes went {took:.1f} s after the broken pipe (session: 20 s)'
    assert registrar.process.wait(5) is not None


def test_sigterm_while_zookeeper_is_down_closes_the_session_when_it_returns(
        own_zookeeper, kazoo_client, zk_path, lone_registrar):
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    registrar = lone_registrar(zookeeper, zk_path, 20000)
    registrar.register(free_port())
    [node] = registrar.wait_registered(1)
    zookeeper.stop()
    time.sleep(0.5)
    registrar.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert registrar.process.poll() is None, 'exited without waiting for ZooKeeper:\n' + registrar.log()
    took = seconds_until_gone(zookeeper, kazoo_client, node)
    assert took < REACHED_WITHIN, f'the node went {took:.1f} s after ZooKeeper returned (session: 20 s)'
    assert registrar.process.wait(5) == 0


class DroppingServers(Background):
    """Listening sockets that accept each connection and close it at once,
    as a ZooKeeper that refuses the client does; records which was reached,
    in order (a client tries one host at a time, so the order is exact)."""

    def __init__(self, count):
        self.sockets = []
        for _ in range(count):
            sock = socket.socket()
            sock.bind(('127.0.0.1', 0))
            sock.listen(16)
            self.sockets.append(sock)
        self.ports = [sock.getsockname()[1] for sock in self.sockets]
        self.reached = []
        super().__init__()

    def close(self):
        for sock in self.sockets:
            sock.close()

    def _run(self):
        with selectors.DefaultSelector() as selector:
            for sock in self.sockets:
                selector.register(sock, selectors.EVENT_READ)
            while not self.stopping.is_set():
                for key, _ in selector.select(0.1):
                    connection, _ = key.fileobj.accept()
                    connection.close()
                    self.reached.append(key.fileobj.getsockname()[1])


def test_each_zookeeper_host_once_and_never_twice_in_a_row(servers, ini, zk_path):
    """A connection string that names a member twice: the registrar tries
    each member equally often, and never the same one twice in a row (a
    frozen member would take a connect timeout each time)."""
    with DroppingServers(2) as members:
        first, second = members.ports
        hosts = f'127.0.0.1:{first},127.0.0.1:{second},127.0.0.1:{first}'
        server = registered_server(servers, ini, hosts, zk_path, 'session_timeout = 10000\n')
        wait_until(lambda: len(members.reached) >= 24, timeout=30, message='24 connection attempts')
        server.stop()
        reached = members.reached[:24]
    assert abs(reached.count(first) - reached.count(second)) <= 1, reached
    repeats = [i for i in range(1, len(reached)) if reached[i] == reached[i - 1]]
    assert not repeats, f'the same member twice in a row at attempts {repeats}: {reached}'


def test_health_check_log_brackets_an_ipv6_address(servers, ini, zookeeper, zk_path):
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = ::1\n'
                 'health_check = /healthz\nhealth_check_interval = 0.5\n')
    server = servers(config).wait_serving()
    server.wait_for_log(r'health check: GET /healthz from \S+ every')
    assert f'health check: GET /healthz from [::1]:{server.port} every' in server.log(), server.log()


def test_a_leaving_registrar_closes_the_session_as_soon_as_zookeeper_answers(own_zookeeper, kazoo_client,
                                                                           zk_path, lone_registrar):
    """Its master gone while ZooKeeper is down: the registrar waits for
    ZooKeeper to close the session. kazoo, down that long, reconnects only
    every 1.2-2.8 s; the registrar probes every 0.25 s and closes the session
    from a new client: the node goes within 1.2 s of ZooKeeper serving
    again, not at a reconnection or the session's expiry (8 s)."""
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    registrar = lone_registrar(zookeeper, zk_path, 8000)
    registrar.register(free_port())
    [node] = registrar.wait_registered(1)
    zookeeper.stop()
    time.sleep(3.0)  # the scenario: kazoo's back-off at its longest
    registrar.process.stdin.close()  # the master is gone
    zookeeper.start()
    serving = time.monotonic()
    zk = kazoo_client(zookeeper.hosts)
    wait_until(lambda: not zk.exists(node), timeout=8, interval=0.02, message='the node to go')
    took = time.monotonic() - serving
    assert took < 1.2, f'the node went {took:.2f} s after ZooKeeper served again:\n{registrar.log()}'
    registrar.process.wait(10)
