"""Health-gated registration against a real ZooKeeper and a real server:
the node follows the application's own health check, while the workers
serve throughout; and the rise and fall rule on its own."""
import json
import os
import time

from support import Load, wait_until
from test_operations import ask, monitor_of
from test_registration import restart_registrar
from zkprefork.registrar import healthcheck

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
INTERVAL, RISE, FALL = 0.5, 2, 3


def test_rise_and_fall():
    health = healthcheck.Health('/healthz', rise=2, fall=3)
    results = [True, False, True, True, False, False, True, False, False, False, True, True]
    changes = [health.record(passed, 'x') for passed in results]
    # DOWN at start; UP after 2 passes in a row; DOWN after 3 failures in a row.
    assert [i for i, changed in enumerate(changes) if changed] == [3, 9, 11]
    assert health.up and (health.rises, health.falls, health.checks, health.failures) == (2, 1, 12, 6)


def test_probe_names_what_failed():
    assert healthcheck.probe('127.0.0.1', 1, '/healthz', 1.0)[0] is False
    assert 'ConnectionRefusedError' in healthcheck.probe('127.0.0.1', 1, '/healthz', 1.0)[1]


def timed(condition, limit, message):
    start = time.monotonic()
    wait_until(condition, timeout=limit + 2, interval=0.01, message=message)
    return time.monotonic() - start


def monitor_health(server):
    return json.loads(ask(monitor_of(server), b'status\n'))['registration']['health']


def test_the_node_follows_the_health_check(servers, ini, zookeeper, zk, zk_path, tmp_path):
    flag = tmp_path / 'unhealthy'
    flag.write_text('')
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\nworkers = 2\n'
                 f'threads = 4\nmonitor_server = 127.0.0.1:0\nhealth_check = /healthz\n'
                 f'health_check_interval = {INTERVAL}\nhealth_check_rise = {RISE}\n'
                 f'health_check_fall = {FALL}\n', app='call:healthapp:factory')
    pythonpath = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get('PYTHONPATH')]))
    server = servers(config, env={'PYTHONPATH': pythonpath, 'HEALTHAPP_FLAG': str(flag)}).wait_serving()
    node = f'{zk_path}/127.0.0.1:{server.port}'
    server.wait_for_log('ZooKeeper connected')
    time.sleep(FALL * INTERVAL)
    assert not zk.exists(node)  # unhealthy from the start: never registered
    with Load(server.port, clients=4) as load:
        flag.unlink()
        assert timed(lambda: zk.exists(node), RISE * INTERVAL + 1, 'the node') < RISE * INTERVAL + 1
        flag.write_text('')
        assert timed(lambda: not zk.exists(node), FALL * INTERVAL + 1, 'the node to go') < FALL * INTERVAL + 1
        flag.unlink()
        assert timed(lambda: zk.exists(node), RISE * INTERVAL + 1, 'the node back') < RISE * INTERVAL + 1
        load.wait_for(10)
    assert load.failures == [] and load.ok > 0  # served throughout
    log = server.log()
    assert log.count('health check /healthz: UP (2 passed in a row, HTTP 200): registering') == 2
    assert log.count('health check /healthz: DOWN (3 failed in a row, last: HTTP 500): '
                     'unregistering') == 1
    # The master hears of the registrar's state a moment after ZooKeeper does.
    wait_until(lambda: monitor_health(server)['state'] == 'up', timeout=5,
               message="the monitor's status to say up")
    health = monitor_health(server)
    assert (health['check'], health['state'], health['rises'], health['falls']) == ('/healthz', 'up', 2, 1)
    assert health['checks'] >= 2 * RISE + FALL and health['last'] == 'HTTP 200'

    # A restarted registrar starts as its predecessor ended (UP): the node stays.
    created = zk.exists(node)
    restart_registrar(server, created.ephemeralOwner, node)
    assert zk.exists(node).czxid == created.czxid


def test_a_hanging_health_check_holds_one_thread_at_most(servers, ini, zookeeper, zk, zk_path, tmp_path):
    """/healthz hangs: the node leaves within fall × interval + 1 s, plain
    requests keep being served by the other thread (a check unanswered is
    never followed by another while it holds an application thread), and
    once /healthz answers again the node is back within (rise + 1) ×
    interval + 1 s."""
    flag = tmp_path / 'hang'
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\nworkers = 1\n'
                 f'threads = 2\nhealth_check = /healthz\nhealth_check_interval = {INTERVAL}\n'
                 f'health_check_rise = {RISE}\nhealth_check_fall = {FALL}\n', app='call:hangapp:factory')
    pythonpath = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get('PYTHONPATH')]))
    server = servers(config, env={'PYTHONPATH': pythonpath, 'HANGAPP_FLAG': str(flag)}).wait_serving()
    node = f'{zk_path}/127.0.0.1:{server.port}'
    wait_until(lambda: zk.exists(node), message='the node')
    flag.write_text('')
    assert timed(lambda: not zk.exists(node), FALL * INTERVAL + 1, 'the node to go') < FALL * INTERVAL + 1
    hanging_until = time.monotonic() + 8 * INTERVAL
    served = 0
    while time.monotonic() < hanging_until:
        assert server.request('/', timeout=2 * INTERVAL + 1)[0] == 200
        served += 1
        time.sleep(0.05)
    assert served > 10
    flag.unlink()
    limit = (RISE + 1) * INTERVAL + 1
    assert timed(lambda: zk.exists(node), limit, 'the node back') < limit
    assert 'the previous check is still unanswered' in server.log()
