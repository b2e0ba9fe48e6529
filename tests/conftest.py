import itertools

import pytest
from kazoo.client import KazooClient
from kazoo.retry import KazooRetry

from support import Processes, Server, ZooKeeperServer, write_ini

_paths = itertools.count(1)


@pytest.fixture(scope='session')
def zookeeper():
    server = ZooKeeperServer().start()
    # /tests made open first: a test that creates its path with makepath
    # and an ACL of its own would otherwise give /tests, if it came first,
    # an ACL every later test's path is refused under.
    client = KazooClient(hosts=server.hosts)
    client.start(15)
    client.ensure_path('/tests')
    client.stop()
    client.close()
    yield server
    server.stop()


@pytest.fixture
def zk(zookeeper):
    """A plain kazoo client of the test's own, to look at what servers registered."""
    client = KazooClient(hosts=zookeeper.hosts)
    client.start(15)
    yield client
    client.stop()
    client.close()


@pytest.fixture
def zk_path(request):
    """A service path of the test's own."""
    return f'/tests/{request.node.name.replace("[", "-").rstrip("]")}-{next(_paths)}/providers'


@pytest.fixture
def servers(tmp_path):
    """Start zkprefork masters; every one is killed (with its children) at the end."""
    started = Processes()
    yield lambda *args, env=None: started.start(Server(args, str(tmp_path), env=env))
    started.kill_all()


@pytest.fixture
def ini(tmp_path):
    """Write an ini file: ini('workers = 2\\n...') -> its path."""
    return lambda options='', **kw: write_ini(str(tmp_path), options, **kw)


@pytest.fixture
def own_zookeeper():
    """own_zookeeper(start=True, **ZooKeeperServer options): a ZooKeeper of the
    test's own (to restart, stop or configure); all are stopped at the end."""
    made = []

    def make(start=True, **options):
        server = ZooKeeperServer(**options)
        made.append(server)
        return server.start() if start else server
    yield make
    for server in made:
        server.stop()


@pytest.fixture
def ensemble():
    """ensemble(size=3, extra=''): QuorumPeerMain servers on 127.0.0.1,
    stopped at the end."""
    from support import start_ensemble
    members = []

    def make(size=3, extra=''):
        started = start_ensemble(size, extra)
        members.extend(started)
        return started
    yield make
    for member in members:
        member.stop()


@pytest.fixture(scope='session')
def tls_files(tmp_path_factory):
    pytest.importorskip('cryptography', reason='the throwaway CA is made with cryptography')
    from support import make_tls_files
    return make_tls_files(str(tmp_path_factory.mktemp('tls')))


@pytest.fixture
def kazoo_client():
    """kazoo_client(hosts, **KazooClient options): started clients of the
    test's own (another server's session, an anonymous reader), stopped at the end."""
    clients = []

    def make(hosts, **options):
        # Reconnect within half a second of ZooKeeper coming back: kazoo's
        # default back-off grows past a test's session timeout while a
        # restarted ZooKeeper boots, and the session expires.
        options.setdefault('connection_retry', KazooRetry(max_tries=-1, max_delay=0.5))
        client = KazooClient(hosts=hosts, **options)
        client.start(15)
        clients.append(client)
        return client
    yield make
    for client in clients:
        client.stop()
        client.close()
