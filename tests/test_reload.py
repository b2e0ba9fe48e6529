"""Rolling reload, resizing and supervision, with real processes under load."""
import os
import signal
import time

import psutil
import pytest

from support import Load, log_times, node_data, wait_until

APP = '''\
import os
import time

VERSION = {version!r}
{boot}

def factory(global_conf, **local):
    def app(environ, start_response):
        if environ['PATH_INFO'] == '/sleep':
            time.sleep(0.2)  # the app's own work: a slow request, on purpose
        body = ('%s %d' % (VERSION, os.getpid())).encode()
        start_response('200 OK', [('Content-Type', 'text/plain'),
                                  ('Content-Length', str(len(body)))])
        return [body]
    return app
'''


@pytest.fixture
def app_module(tmp_path):
    """Write (and rewrite) the application module the workers import."""
    def write(version='v1', boot=''):
        (tmp_path / 'versioned_app.py').write_text(APP.format(version=version, boot=boot))
    write()
    return write


@pytest.fixture
def start(servers, ini, tmp_path, app_module, zookeeper, zk_path):
    env = {'PYTHONPATH': str(tmp_path), 'PYTHONDONTWRITEBYTECODE': '1'}

    def start(options='', registered=True):
        zk_options = f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\n' if registered else ''
        config = ini(f'host = 127.0.0.1\n{zk_options}{options}', app='call:versioned_app:factory')
        return servers(config, env=env).wait_serving()
    return start


def versions(load):
    return {body.split()[0] for body in load.bodies}


def pids_answering(load):
    return {int(body.split()[1]) for body in load.bodies}


def wait_for_node(zk, zk_path):
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    return f'{zk_path}/{zk.get_children(zk_path)[0]}'


def record_children(zk, zk_path):
    """Every child list ZooKeeper reports for the path, as it changes."""
    seen = []
    zk.ChildrenWatch(zk_path, lambda children: seen.append(sorted(children)))
    return seen


def wait_all_replaced(server, old, count):
    def replaced():
        pids = server.worker_pids()
        return len(pids) == count and not pids & old and pids
    return wait_until(replaced, timeout=30, message='every worker to be replaced')


def test_hup_twice_under_load_drops_nothing(start, app_module, zk, zk_path):
    server = start('workers = 4\nthreads = 4\n')
    node = wait_for_node(zk, zk_path)
    children_seen = record_children(zk, zk_path)
    old = server.worker_pids()
    assert len(old) == 4
    with Load(server.port, clients=50) as load:
        load.wait_for(500)
        app_module('v2')
        server.signal(signal.SIGHUP)
        wait_until(lambda: server.worker_pids() - old, message='the rolling reload to start')
        server.signal(signal.SIGHUP)  # a second HUP during the rolling restarts it
        new = wait_all_replaced(server, old, 4)
        wait_until(lambda: server.log().count('ready') >= 8, message='the new workers')
        load.wait_for(500)
        before_v2 = load.ok
        wait_until(lambda: b'v2' in b' '.join(load.bodies), message='v2 to be served')
    print(f'HUP under load: {load.ok} responses, {len(load.failures)} failures')
    assert load.failures == []
    assert load.ok > before_v2
    assert versions(load) == {b'v1', b'v2'}
    assert all(children for children in children_seen), f'the node left ZooKeeper: {children_seen}'
    assert node_data(zk, node)['generation'] == 2
    assert len(new) == 4


def test_broken_app_on_hup_keeps_old_workers(start, app_module):
    server = start('workers = 2\n', registered=False)
    old = server.worker_pids()
    app_module(boot='raise RuntimeError("deploy went wrong")')
    with Load(server.port, clients=10) as load:
        load.wait_for(100)
        server.signal(signal.SIGHUP)
        server.wait_for_log('reload halted.*deploy went wrong.*nothing is retried before the next SIGHUP')
        load.wait_for(100)
    assert load.failures == []
    assert 'next try' not in server.log()
    assert server.worker_pids() == old
    assert server.process.poll() is None
    # A fixed deploy and another HUP go through.
    app_module('v3')
    server.signal(signal.SIGHUP)
    wait_all_replaced(server, old, 2)
    wait_until(lambda: server.request('/')[1].startswith(b'v3'), message='v3')


def test_broken_config_on_hup_keeps_running_config(start, ini, app_module):
    server = start('workers = 2\n', registered=False)
    old = server.worker_pids()
    ini('workers = 0\n', app='call:versioned_app:factory')
    server.signal(signal.SIGHUP)
    server.wait_for_log(r"configuration is not valid, keeping the running one: workers: '0'")
    time.sleep(0.5)  # the scenario: nothing may happen now (a replacement would start within this)
    assert server.worker_pids() == old
    assert server.request('/')[0] == 200


def test_ttin_and_ttou_change_workers_and_node_data(start, zk, zk_path):
    server = start('workers = 2\n')
    node = wait_for_node(zk, zk_path)
    server.signal(signal.SIGTTIN)
    wait_until(lambda: len(server.worker_pids()) == 3, message='three workers')
    wait_until(lambda: node_data(zk, node)['workers'] == 3, message='workers 3 in the node')
    for handled in (1, 2, 3):
        server.signal(signal.SIGTTOU)
        # One at a time: two signals sent at once may be delivered as one.
        wait_until(lambda: server.log().count('SIGTTOU: now') >= handled, message=f'TTOU {handled} handled')
    wait_until(lambda: len(server.worker_pids()) == 1, message='one worker (never fewer)')
    wait_until(lambda: node_data(zk, node)['workers'] == 1, message='workers 1 in the node')
    assert server.request('/')[0] == 200


def test_stopped_worker_is_replaced_after_timeout(start):
    server = start('workers = 2\ntimeout = 2\n', registered=False)
    victim = sorted(server.worker_pids())[0]
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        server.wait_for_log(rf'worker \d \(pid {victim}\) sent no heartbeat', timeout=10)
        wait_until(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2,
                   message='a replacement')
        assert time.monotonic() - stopped_at < 8
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGKILL)
    assert server.request('/')[0] == 200


def test_max_requests_recycles_under_load_without_failures(start):
    server = start('workers = 2\nthreads = 2\nmax_requests = 300\nmax_requests_jitter = 50\n',
                   registered=False)
    old = server.worker_pids()
    with Load(server.port, clients=20) as load:
        # Recycled at the 300th request or so: replacements boot all the time.
        wait_until(lambda: not server.worker_pids() & old, timeout=30, message='the first workers replaced')
        load.wait_for(200)
    assert load.failures == []
    assert 'served' in server.log() and 'max_requests' in server.log()


def test_max_memory_recycles(start):
    server = start('workers = 1\nmax_memory = 1\n', registered=False)
    old = server.worker_pids()
    server.wait_for_log(r'asks to be replaced: resident memory \d+ MB > max_memory')
    wait_all_replaced(server, old, 1)
    assert server.request('/')[0] == 200


def test_worker_that_always_fails_at_boot_is_backed_off(start, app_module):
    server = start('workers = 1\n', registered=False)
    app_module(boot='raise ImportError("no such module")')
    [victim] = server.worker_pids()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(log_times(server, 'next try in')) >= 3, message='three failed boots')
    first, second, third = log_times(server, 'next try in')[:3]
    # Forked again 0.5 s, then 1 s after each failure (plus its boot): not a loop.
    assert second - first >= 0.45 and third - second >= 0.95, (first, second, third)
    assert server.process.poll() is None
    app_module('v4')
    wait_until(lambda: server.worker_pids() and server.log().count('ready') >= 2, timeout=20,
               message='recovery once the app boots again')


def test_reload_logs_every_worker_exit(start):
    server = start('workers = 2\n', registered=False)
    old = server.worker_pids()
    server.signal(signal.SIGHUP)
    wait_all_replaced(server, old, 2)
    for pid in old:
        server.wait_for_log(rf'worker \d \(pid {pid}\) exited: exit status 0')


def pipe_inodes(pid):
    inodes = set()
    for fd in os.listdir(f'/proc/{pid}/fd'):
        try:
            target = os.readlink(f'/proc/{pid}/fd/{fd}')
        except FileNotFoundError:
            continue
        if target.startswith('pipe:'):
            inodes.add(target)
    return inodes


@pytest.mark.parametrize('preload', ['false', 'true'])
def test_workers_never_share_a_wakeup_pipe(start, app_module, preload):
    # The app imports zope.server at import time: with preload that happens in
    # the master, before fork, which would give every worker the same trigger.
    app_module(boot='import zope.server.dualmodechannel')
    server = start(f'workers = 2\npreload = {preload}\n', registered=False)
    first, second = server.worker_pids()
    assert pipe_inodes(first) and pipe_inodes(second)
    assert not pipe_inodes(first) & pipe_inodes(second)
    with Load(server.port, clients=8) as load:
        load.wait_for(400)
    assert load.failures == []


def test_preload_loads_once_and_hup_keeps_the_loaded_code(start, app_module, tmp_path):
    marker = tmp_path / 'imported-by'
    app_module(boot=f'open({str(marker)!r}, "a").write("%d\\n" % os.getpid())')
    server = start('workers = 2\npreload = true\n', registered=False)
    assert marker.read_text().split() == [str(server.pid)]
    old = server.worker_pids()
    app_module('v2')
    server.signal(signal.SIGHUP)
    wait_all_replaced(server, old, 2)
    assert server.request('/')[1].startswith(b'v1')
    assert marker.read_text().split() == [str(server.pid)]


def test_signals_to_the_whole_process_group_kill_no_worker(start):
    # `pkill -HUP zkprefork` or systemd's KillMode reach every process.
    server = start('workers = 2\n', registered=False)
    old = server.worker_pids()
    for signum, handled in ((signal.SIGUSR1, 'SIGUSR1: reopening'), (signal.SIGTTIN, 'SIGTTIN: now'),
                            (signal.SIGHUP, 'SIGHUP: reloading')):
        os.killpg(server.pid, signum)
        server.wait_for_log(handled)  # in this order
    wait_all_replaced(server, old, 3)
    assert 'killed by' not in server.log()
    assert 'exited unexpectedly' not in server.log()
