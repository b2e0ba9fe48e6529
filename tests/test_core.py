"""The core: N workers on one port, one registration, clean stops."""
import http.client
import json
import os
import signal
import threading
import time

import psutil

from support import free_port, log_times, wait_accepted, wait_until


def test_registers_one_node_and_spreads_requests_over_workers(servers, ini, zookeeper, zk, zk_path):
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\n'
                 'workers = 3\nthreads = 2\n')
    server = servers(config).wait_serving()
    node = f'127.0.0.1:{server.port}'
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    assert zk.get_children(zk_path) == [node]
    data, stat = zk.get(f'{zk_path}/{node}')
    assert stat.ephemeralOwner != 0
    assert json.loads(data) == {'pid': server.pid, 'workers': 3, 'generation': 0,
                                'instance': json.loads(data)['instance']}
    assert data == json.dumps(json.loads(data), separators=(',', ':')).encode()

    workers = server.worker_pids()
    assert len(workers) == 3
    answered_by = set()

    def spread():
        # A new connection each time: which worker accepts it is the kernel's
        # choice, so ask until more than one has answered.
        status, body = server.request('/')
        assert status == 200
        answered_by.add(int(body.split(b'pid ')[1].rstrip(b')\n')))
        return len(answered_by) > 1
    wait_until(spread, timeout=20, interval=0.005, message='a second worker to answer')
    assert answered_by <= workers


def test_server_port_is_the_real_port(servers, ini):
    server = servers(ini('host = 127.0.0.1\n')).wait_serving()
    status, body = server.request('/environ')
    environ = json.loads(body)
    assert environ['SERVER_PORT'] == str(server.port)


def test_killed_worker_is_replaced(servers, ini):
    server = servers(ini('host = 127.0.0.1\nworkers = 2\n')).wait_serving()
    before = server.worker_pids()
    victim = sorted(before)[0]
    psutil.Process(victim).kill()
    after = wait_until(lambda: (pids := server.worker_pids()) and len(pids) == 2 and victim not in pids and pids,
                       message='a replacement worker')
    assert len(after & before) == 1
    wait_until(lambda: server.log().count('ready') >= 3, message='the replacement to be ready')
    assert server.request('/')[0] == 200


def test_sigterm_finishes_in_flight_request_after_node_is_gone(servers, ini, zookeeper, zk, zk_path):
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\nworkers = 2\n')
    server = servers(config).wait_serving()
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    result = {}
    connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
    connection.connect()

    def slow_request():
        connection.request('GET', '/sleep?s=2')
        response = connection.getresponse()
        result['response'] = response.status, response.read()
        result['node_at_completion'] = zk.get_children(zk_path)

    client = threading.Thread(target=slow_request)
    client.start()
    wait_accepted(server, connection.sock)  # the request is in flight
    server.signal(signal.SIGTERM)
    wait_until(lambda: zk.get_children(zk_path) == [], timeout=2, message='the node to go')
    assert client.is_alive(), 'the slow request finished before the node was gone'
    client.join(10)
    assert result['response'][0] == 200
    assert result['node_at_completion'] == []
    assert server.wait(15) == 0
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in server.seen_pids)


def test_sigkill_of_master_removes_node_and_workers_exit(servers, ini, zookeeper, zk, zk_path):
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\nworkers = 2\n'
                 'session_timeout = 30000\n')
    server = servers(config).wait_serving()
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    children = server.children()
    assert len(children) == 3  # two workers and the registrar
    killed_at = time.monotonic()
    server.signal(signal.SIGKILL)
    wait_until(lambda: zk.get_children(zk_path) == [], timeout=1.0, message='the node to go')
    assert time.monotonic() - killed_at < 1.0

    def all_gone():
        return not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE
                       for child in children)
    wait_until(all_gone, timeout=5, message='workers and registrar to exit')


def test_runs_unregistered_without_zookeeper(servers, ini):
    server = servers(ini('host = 127.0.0.1\n')).wait_serving()
    assert 'serving unregistered' in server.log()
    assert server.request('/')[0] == 200
    server.signal(signal.SIGINT)
    assert server.wait(15) == 0


def test_a_registrar_that_dies_at_start_is_backed_off(servers, ini, zookeeper, zk_path, tmp_path):
    # A registrar whose kazoo cannot be imported dies at once, every time.
    (tmp_path / 'kazoo').mkdir()
    (tmp_path / 'kazoo' / '__init__.py').write_text('raise ImportError("kazoo is broken here")\n')
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\n')
    server = servers(config, env={'PYTHONPATH': str(tmp_path)}).wait_serving()
    wait_until(lambda: len(log_times(server, 'restarting it in')) >= 3, message='three registrar deaths')
    first, second, third = log_times(server, 'restarting it in')[:3]
    # Restarted 0.5 s, then 1 s after each death (plus its start): not a loop.
    assert second - first >= 0.45 and third - second >= 0.95, (first, second, third)
    assert server.request('/')[0] == 200
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0


def test_sigterm_to_the_whole_process_group(servers, ini, zookeeper, zk, zk_path):
    # `pkill zkprefork`: master, workers and registrar all get SIGTERM at once.
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\nworkers = 2\n')
    server = servers(config).wait_serving()
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    os.killpg(server.pid, signal.SIGTERM)
    assert server.wait(15) == 0
    assert zk.get_children(zk_path) == []


def test_sigterm_while_zookeeper_is_unreachable(servers, ini, zk_path):
    # Registered in intent, never in fact: the stop must not wait for ZooKeeper.
    config = ini(f'zookeeper = 127.0.0.1:{free_port()}\npath = {zk_path}\nhost = 127.0.0.1\n')
    server = servers(config).wait_serving()
    server.wait_for_log('Connection dropped: socket connection error')  # tried and failed to connect
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
