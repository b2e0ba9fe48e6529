import itertools

import pytest
from kazoo.client import KazooClient

from support import Server, ZooKeeperServer, write_ini

_paths = itertools.count(1)


@pytest.fixture(scope='session')
def zookeeper():
    server = ZooKeeperServer().start()
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
    started = []

    def start(*args, env=None):
        server = Server(args, str(tmp_path), env=env).start()
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def ini(tmp_path):
    """Write an ini file: ini('workers = 2\\n...') -> its path."""
    return lambda options='', **kw: write_ini(str(tmp_path), options, **kw)
