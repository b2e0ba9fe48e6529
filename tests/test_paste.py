"""The PasteDeploy server runner (``use = egg:zkprefork``): loadserver and pserve.

The runner is exercised in a subprocess of its own (a small script, or
pserve), never in the test process: it forks, installs signal handlers and
only returns when stopped.
"""
import json
import re
import signal
import socket
import sys
import textwrap

import pytest
from paste.deploy import loadserver

from support import Processes, Server, free_port, wait_until
from zkprefork.testing import four_letter_word
from test_bad_input import assert_not_registered, assert_one_line_error, run_zkprefork, session_processes

pytestmark = pytest.mark.timeout(60)

LOADSERVER_SCRIPT = '''\
import sys
from paste.deploy import loadapp, loadserver

uri = 'config:' + sys.argv[1]
server = loadserver(uri)
server(loadapp(uri))
'''


class Command(Server):
    """A zkprefork master started by any command line (pserve, a script)."""

    command = ()

    def kill(self):
        """As Server.kill, plus whatever else is left in its session."""
        if self.process is not None:
            self.seen_pids |= set(session_processes(self.pid))
        super().kill()


@pytest.fixture
def commands(tmp_path):
    started = Processes()
    yield lambda *command: started.start(Command(command, str(tmp_path)))
    started.kill_all()


@pytest.fixture
def script(tmp_path):
    path = tmp_path / 'serve_with_loadserver.py'
    path.write_text(LOADSERVER_SCRIPT)
    return path


def negotiated_session_timeout(zookeeper, session_id):
    """The session timeout (ms) ZooKeeper agreed to for a session, from `cons`."""
    for line in four_letter_word(zookeeper.port, 'cons').splitlines():
        if f'sid=0x{session_id:x},' in line:
            return int(re.search(r'\bto=(\d+)', line).group(1))
    raise AssertionError(f'session 0x{session_id:x} not in cons')


def served_ini(ini, zookeeper, zk_path, port, workers=2, extra=''):
    return ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\n'
               f'port = {port}\nworkers = {workers}\nthreads = 2\n{extra}')


def check_serving_and_registered(server, zk, zk_path, port, workers):
    server.wait_serving()
    assert server.port == port
    status, body = server.request('/')
    assert status == 200 and body.startswith(b'Hello from zkprefork (pid ')
    assert len(server.worker_pids()) == workers
    served_by = int(body.split(b'pid ')[1].rstrip(b')\n'))
    assert served_by in server.worker_pids()

    node = f'127.0.0.1:{port}'
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    assert zk.get_children(zk_path) == [node]
    data, stat = zk.get(f'{zk_path}/{node}')
    assert json.loads(data)['pid'] == server.pid
    assert json.loads(data)['workers'] == workers
    assert stat.ephemeralOwner != 0
    return stat.ephemeralOwner


def check_stops_on_sigterm(server, zk, zk_path):
    server.children()  # its pids, for the teardown to kill should this fail
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0, server.log()
    assert zk.get_children(zk_path) == []
    assert session_processes(server.pid) == []


def test_loadserver_returns_a_callable(ini, zookeeper, zk_path):
    config = served_ini(ini, zookeeper, zk_path, free_port())
    server = loadserver('config:' + config)
    assert callable(server)


def test_loadserver_in_a_subprocess_serves_registers_and_stops(
        commands, script, ini, zookeeper, zk, zk_path):
    port = free_port()
    config = served_ini(ini, zookeeper, zk_path, port, workers=3, extra='session_timeout = 1000\n')
    server = commands(sys.executable, script, config)
    session_id = check_serving_and_registered(server, zk, zk_path, port, workers=3)
    # session_timeout is in milliseconds: 1000 ms is inside the server's
    # bounds (400-4000 ms with tickTime 200); taken as seconds it would be clamped to 4000.
    assert negotiated_session_timeout(zookeeper, session_id) == 1000
    check_stops_on_sigterm(server, zk, zk_path)


def test_loadserver_serves_the_callers_app_object(commands, tmp_path, ini, zookeeper, zk, zk_path):
    """The runner serves the app it is given (not one it loads itself)."""
    port = free_port()
    config = served_ini(ini, zookeeper, zk_path, port, workers=1)
    path = tmp_path / 'serve_own_app.py'
    path.write_text(textwrap.dedent('''\
        import sys
        from paste.deploy import loadserver

        def app(environ, start_response):
            body = b'the caller app'
            start_response('200 OK', [('Content-Length', str(len(body)))])
            return [body]

        loadserver('config:' + sys.argv[1])(app)
        '''))
    server = commands(sys.executable, path, config).wait_serving()
    assert server.request('/') == (200, b'the caller app')
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    check_stops_on_sigterm(server, zk, zk_path)


@pytest.mark.parametrize('option, expected', [
    ('workers = 0', ['workers', "'0'"]),
    ('colour = blue', ['colour']),
    ('path = relative', ['path', "'relative'"]),
])
def test_loadserver_with_a_bad_option_exits_2_with_one_line(tmp_path, script, ini, zookeeper, zk,
                                                           zk_path, option, expected):
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\n'
                 if not option.startswith('path') else
                 f'zookeeper = {zookeeper.hosts}\nhost = 127.0.0.1\n')
    with open(config, 'a') as file:
        file.write(option + '\n')
    result = run_zkprefork([script, config], tmp_path, command=[sys.executable])
    assert_one_line_error(result, *expected)
    assert_not_registered(zk, zk_path)


def test_loadserver_with_a_port_in_use_exits_2_with_one_line(tmp_path, script, ini, zookeeper, zk,
                                                            zk_path):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = served_ini(ini, zookeeper, zk_path, port)
        result = run_zkprefork([script, config], tmp_path, command=[sys.executable])
    assert_one_line_error(result, 'port', str(port))
    assert_not_registered(zk, zk_path)


# -- pserve (pyramid: installed here, but not a dependency of zkprefork) -----------------------

def pserve_command():
    pytest.importorskip('pyramid.scripts.pserve')
    return [sys.executable, '-m', 'pyramid.scripts.pserve']


def test_pserve_serves_registers_and_stops(commands, ini, zookeeper, zk, zk_path):
    command = pserve_command()
    port = free_port()
    config = served_ini(ini, zookeeper, zk_path, port, workers=2)
    server = commands(*command, config)
    check_serving_and_registered(server, zk, zk_path, port, workers=2)
    check_stops_on_sigterm(server, zk, zk_path)


def test_pserve_with_a_bad_option_reports_it_and_leaves_nothing(tmp_path, ini, zookeeper, zk, zk_path):
    """pserve catches SystemExit and exits 0 itself ('Exiting 2 (-v to see
    traceback)'): the status is pserve's, but the error line is ours and
    nothing may be started."""
    command = pserve_command()
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\nworkers = 0\n')
    result = run_zkprefork([config], tmp_path, command=command)
    output = result.stdout + result.stderr
    assert "zkprefork: error: workers: '0' is out of range" in output, result
    assert 'Traceback' not in output, result
    assert result.leftovers == [], result
    assert_not_registered(zk, zk_path)
