"""Nothing grows with reloads (issue 18 item 3): after any number of HUPs
(threads and workers changed each time), SIGTTIN/SIGTTOU and a worker
killed and replaced, the master's and the registrar's open fds, threads and
the master's scoreboard mappings are what they were after the first boot,
and so is what the master keeps on its frozen heap. Real processes and a
real ZooKeeper; the counts are read from /proc."""
import gc
import json
import os
import signal
import threading
import time

import psutil
import pytest

from support import wait_until
from test_operations import ask, monitor_of
from zkprefork.testing import IdleClients, http_get
from zkprefork.worker import scoreboard

pytestmark = pytest.mark.timeout(90)

APP = '''\
import os
import time

def factory(global_conf, **local):
    def app(environ, start_response):
        time.sleep(float(environ.get('QUERY_STRING') or 0))
        body = str(os.getpid()).encode()
        start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])
        return [body]
    return app
'''

# Loaded by every zkprefork process of these tests: on PROBE_SIGNAL, a process
# appends how many objects it holds frozen (gc.freeze) to a file of its own.
# (A real-time signal: zkprefork handles none of them, and it does USR2.)
PROBE_SIGNAL = signal.SIGRTMIN + 1
FREEZE_PROBE = '''\
import gc
import os
import signal

def _tell(signum, frame):
    with open(os.path.join(os.environ['FREEZE_PROBE_DIR'], str(os.getpid())), 'a') as file:
        file.write('%d\\n' % gc.get_freeze_count())

signal.signal(signal.SIGRTMIN + 1, _tell)
'''


def board_mappings(pid):
    """The process's shared anonymous mappings (a scoreboard each: mmap(-1)
    shows as /dev/zero), by address range."""
    with open(f'/proc/{pid}/maps') as maps:
        return [line.split()[0] for line in maps
                if line.rstrip().endswith('/dev/zero (deleted)') and line.split()[1][3] == 's']


def counts(pid):
    return {'fds': len(os.listdir(f'/proc/{pid}/fd')), 'threads': len(os.listdir(f'/proc/{pid}/task'))}


@pytest.fixture
def start(servers, ini, tmp_path, zookeeper, zk_path):
    """start(options) -> (server, monitor address), registered in ZooKeeper."""
    (tmp_path / 'sleep_app.py').write_text(APP)
    (tmp_path / 'sitecustomize.py').write_text(FREEZE_PROBE)
    env = {'PYTHONPATH': os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')])),
           'PYTHONDONTWRITEBYTECODE': '1', 'FREEZE_PROBE_DIR': str(tmp_path)}

    def start(options):
        config = ini(f'host = 127.0.0.1\nmonitor_server = 127.0.0.1:0\nzookeeper = {zookeeper.hosts}\n'
                     f'path = {zk_path}\n{options}', app='call:sleep_app:factory')
        server = servers(config, env=env).wait_serving()
        server.config = config
        return server, monitor_of(server)
    return start


def status(monitor):
    return json.loads(ask(monitor, b'status\n'))


def reconfigure(server, workers, threads):
    """Rewrite the ini's workers and threads, and SIGHUP."""
    with open(server.config) as file:
        kept = [line for line in file if not line.startswith(('workers =', 'threads ='))]
    with open(server.config, 'w') as file:
        file.writelines(kept + [f'workers = {workers}\n', f'threads = {threads}\n'])
    server.signal(signal.SIGHUP)


def settle(server, monitor, workers):
    """Wait until `workers` up-to-date workers are ready, every other one
    reaped, and the node registered; returns the status."""
    last = []

    def settled():
        now = status(monitor)
        last[:] = [now]
        ready = [w for w in now['workers'] if w['state'] == 'ready' and w['generation'] == now['generation']]
        try:
            children = psutil.Process(server.pid).children()
            reaped = all(child.status() != psutil.STATUS_ZOMBIE for child in children)
        except psutil.NoSuchProcess:  # a child just reaped
            return False
        registered = now['registration']['state'] == 'connected' and now['registration']['nodes']
        return (len(ready) == len(now['workers']) == workers and len(children) == workers + 1
                and reaped and registered and now)
    try:
        return wait_until(settled, timeout=20)
    except AssertionError:
        raise AssertionError(f'not {workers} fresh, ready workers and no other: {last}, '
                             f'children {psutil.Process(server.pid).children()}') from None


def registrar_pid(server):
    [pid] = server.titled('zkprefork: registrar')
    return pid


def resources(server, monitor):
    """What must not grow: the master's and the registrar's fds and
    threads, the master's scoreboard mappings, and each worker's."""
    return {'master': counts(server.pid), 'registrar': counts(registrar_pid(server)),
            'master boards': len(board_mappings(server.pid)),
            'worker boards': sorted(len(board_mappings(w['pid'])) for w in status(monitor)['workers'])}


def frozen(server, tmp_path):
    """How many objects the master holds frozen (it freezes before each fork)."""
    path = tmp_path / str(server.pid)
    told = path.read_text().count('\n') if path.exists() else 0
    server.signal(PROBE_SIGNAL)
    wait_until(lambda: path.exists() and path.read_text().count('\n') > told, message='the freeze count')
    return int(path.read_text().split()[-1])


def same_resources(server, monitor, expected):
    """The resources, once equal to `expected` (a monitor connection just
    closed may still hold an fd for a moment); the last reading if never."""
    seen = []
    try:
        wait_until(lambda: seen.append(resources(server, monitor)) or seen[-1] == expected, timeout=3)
    except AssertionError:
        pass
    return seen[-1]


def steady_resources(server, monitor):
    """The resources once three readings in a row agree: a monitor
    connection of the previous reading may still hold an fd for a moment."""
    seen = []
    wait_until(lambda: seen.append(resources(server, monitor)) or seen[-3:] == [seen[-1]] * 3,
               timeout=10, interval=0.1, message='the resources to settle')
    return seen[-1]


def test_reloads_resizes_and_a_killed_worker_leave_no_resource_behind(start, tmp_path):
    server, monitor = start('workers = 2\nthreads = 2\n')
    settle(server, monitor, 2)
    after_boot = steady_resources(server, monitor)
    assert after_boot['master boards'] == 1 and after_boot['worker boards'] == [1, 1]
    reconfigure(server, 2, 2)  # the first reload loads what reloading needs, once
    settle(server, monitor, 2)
    frozen_after_first_reload = frozen(server, tmp_path)
    with IdleClients(server.port, clients=4):  # keep-alive connections through it all
        for workers, threads in ((1, 3), (3, 1), (2, 4), (1, 5), (2, 2), (3, 6)):
            reconfigure(server, workers, threads)
            settle(server, monitor, workers)
        server.signal(signal.SIGTTOU)
        settle(server, monitor, 2)
        os.kill(status(monitor)['workers'][0]['pid'], signal.SIGKILL)
        settle(server, monitor, 2)
        server.signal(signal.SIGTTIN)
        settle(server, monitor, 3)
        for count in (2, 1):  # one at a time: two pending SIGTTOUs are one signal
            server.signal(signal.SIGTTOU)
            settle(server, monitor, count)
        reconfigure(server, 2, 2)  # workers changed in the ini (3 -> 2): the TTOUs' count goes
        settle(server, monitor, 2)
    after_reloads, frozen_now = same_resources(server, monitor, after_boot), frozen(server, tmp_path)
    print(f'after boot {after_boot}, after the reloads {after_reloads}; '
          f'frozen objects {frozen_after_first_reload} -> {frozen_now}')
    assert after_reloads == after_boot
    # Cyclic garbage frozen at a fork is never freed: each reload's parsed
    # ini file (~80 objects), each old board's record class; +3500 here.
    # What stays is one-off (ctypes' cached array type per thread count).
    assert frozen_now - frozen_after_first_reload < 300


def test_a_worker_draining_with_the_old_thread_count_keeps_its_board(start):
    server, monitor = start('workers = 1\nthreads = 1\n')
    [old] = settle(server, monitor, 1)['workers']
    answer = []
    slow = threading.Thread(target=lambda: answer.append(http_get(server.port, '/?5', timeout=20)))
    slow.start()
    try:
        wait_until(lambda: status(monitor)['workers'][0]['busy_threads'], message='the slow request')
        reconfigure(server, 1, 3)  # a new board: the old one has one thread only

        def draining():
            workers = {w['pid']: w for w in status(monitor)['workers']}
            new = [w for pid, w in workers.items() if pid != old['pid'] and w['state'] == 'ready']
            return new and workers.get(old['pid'], {}).get('state') == 'retiring' and (workers, new[0])
        workers, new = wait_until(draining, message='the new worker ready while the old one drains')
        # The master still reads the old worker's record, in the old board.
        [busy] = workers[old['pid']]['busy_threads']
        assert busy['request'] == 'GET /?5 HTTP/1.1'
        assert len(board_mappings(server.pid)) == 2
        assert len(board_mappings(new['pid'])) == 1  # its own board only
        assert len(board_mappings(old['pid'])) == 1
    finally:
        slow.join(20)
    assert answer == [(200, str(old['pid']).encode())]
    settle(server, monitor, 1)
    wait_until(lambda: len(board_mappings(server.pid)) == 1, timeout=3, message='the old board unmapped')


def test_a_board_that_no_worker_uses_is_unmapped_at_once():
    # The master freezes the collector before every fork, so a board's
    # cycle (records <-> board) is never collected there: nor here.
    gc.disable()
    try:
        before = set(board_mappings(os.getpid()))
        boards = scoreboard.Scoreboards(workers=1, threads=1)
        first = boards.claim(1, 1)
        bigger = boards.claim(1, 4)  # a reload raised threads: a second board
        assert len(set(board_mappings(os.getpid())) - before) == 2
        boards.release(first)
        assert len(set(board_mappings(os.getpid())) - before) == 1
        for read in (lambda: first.state, first.requests, first.busy):
            with pytest.raises((AttributeError, TypeError)):
                read()  # a record of a closed board raises, never reads unmapped memory
        boards.release(bigger)  # the newest board stays, empty, for the next worker
        assert len(set(board_mappings(os.getpid())) - before) == 1
        assert boards.boards == [bigger.board] and boards.claim(1, 2).board is bigger.board
    finally:
        gc.enable()


def wait_child(pid, timeout=10.0):
    """The wait status of a forked child, killed if still running after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return wait_status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.01)


def test_a_new_worker_maps_its_own_board_only():
    boards = scoreboard.Scoreboards(workers=1, threads=1)
    draining = boards.claim(1, 1)
    record = boards.claim(1, 2)  # a reload raised threads: a second board
    inherited = len(board_mappings(os.getpid()))
    pid = os.fork()
    if pid == 0:
        try:
            boards.keep_only(record.board)
            record.head.connections = len(board_mappings(os.getpid()))
        finally:
            os._exit(0)
    assert wait_child(pid) == 0
    assert record.head.connections == inherited - 1  # the child told, in its own board
    assert len(board_mappings(os.getpid())) == inherited  # the master's stay mapped, and readable:
    assert draining.state == scoreboard.EMPTY and boards.boards == [draining.board, record.board]
