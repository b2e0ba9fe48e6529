"""The master's signals from its first instruction: while a preloaded
application loads (3 s), before any worker or registrar exists."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from support import node_data, wait_until

SLOW_APP = '''\
import os
import time

open({marker!r}, 'w').close()
time.sleep(3)  # a slow import: the window the signals arrive in


def factory(global_conf, **local):
    def app(environ, start_response):
        start_response('200 OK', [('Content-Length', '2')])
        return [b'ok']
    return app
'''


@pytest.fixture
def loading(servers, ini, tmp_path, zookeeper, zk_path):
    """Start a master that preloads the slow app; return it once the load has begun."""
    marker = tmp_path / 'loading'
    (tmp_path / 'slowapp.py').write_text(SLOW_APP.format(marker=str(marker)))
    config = ini(f'host = 127.0.0.1\nworkers = 2\npreload = true\n'
                 f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\n', app='call:slowapp:factory')
    server = servers(config, env={'PYTHONPATH': str(tmp_path), 'PYTHONDONTWRITEBYTECODE': '1'})
    wait_until(marker.exists, message='the preload to begin')
    return server


def group_members(pgid):
    """Live processes of the process group (the master's session)."""
    found = []
    for process in psutil.process_iter(['status']):
        try:
            if os.getpgid(process.pid) == pgid and process.info['status'] != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_preloading_exits_0_with_nothing_left(loading, signum, zk, zk_path):
    loading.signal(signum)
    assert loading.wait(timeout=15) == 0, loading.log()
    assert group_members(loading.pid) == []
    assert not zk.exists(zk_path) or zk.get_children(zk_path) == []
    assert f'{signal.Signals(signum).name}: stopping before serving' in loading.log()


@pytest.mark.parametrize('signum, handled', [(signal.SIGHUP, 'SIGHUP: reloading'),
                                             (signal.SIGUSR1, 'SIGUSR1: reopening log files')])
def test_a_reload_or_reopen_while_preloading_is_handled_once_serving(loading, signum, handled,
                                                                     zk, zk_path):
    loading.signal(signum)
    loading.wait_serving(timeout=30)
    loading.wait_for_log(handled)
    assert loading.request('/')[1] == b'ok'
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    node = f'{zk_path}/{zk.get_children(zk_path)[0]}'
    generation = 1 if signum == signal.SIGHUP else 0
    wait_until(lambda: node_data(zk, node)['generation'] == generation,
               message=f'generation {generation} in {json.dumps(node_data(zk, node))}')
    assert loading.stop() == 0, loading.log()


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_held_from_the_first_instruction_meets_the_queue(ini, tmp_path, signum):
    """The signal sent at once to a master that starts with it blocked (as
    a live upgrade starts one, and as the command blocks it at its first
    line): pending until the queue is installed, then handled there. A stop
    exits 0 (not a traceback out of the install); a HUP waits for the loop."""
    config = ini('host = 127.0.0.1\nworkers = 1\n')

    def blocked():
        signal.pthread_sigmask(signal.SIG_BLOCK, [signum])
    process = subprocess.Popen([sys.executable, '-m', 'zkprefork.cli', config], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, preexec_fn=blocked, start_new_session=True)
    try:
        process.send_signal(signum)
        if signum == signal.SIGTERM:
            output = process.communicate(timeout=30)[0].decode()
            assert process.returncode == 0 and 'Traceback' not in output, output
        else:
            wait_until(lambda: group_members(process.pid) and psutil.Process(process.pid).status() != 'zombie'
                       and process.poll() is None and len(psutil.Process(process.pid).children()) >= 1,
                       timeout=15, message='the master serving')
            time.sleep(0.5)
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
