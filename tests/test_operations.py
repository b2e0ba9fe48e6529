"""Operations: the monitor, logging, trace and access logs, process titles,
the pidfile and systemd, each against a real running zkprefork."""
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time

import psutil
import pytest

from support import ProcessUnderTest, free_port, node_data, wait_until


def ask(address, command, timeout=10):
    """Send one monitor command; the answer is everything until the server closes."""
    host, port = address
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(command)
        answer = b''
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode()


def monitor_of(server):
    match = server.wait_for_log(r'monitor listening at (\S+):(\d+)')
    return match.group(1), int(match.group(2))


@pytest.fixture
def monitored(servers, ini):
    def start(options='', **kw):
        server = servers(ini(f'host = 127.0.0.1\nmonitor_server = 127.0.0.1:0\n{options}'), **kw)
        server.wait_serving()
        return server, monitor_of(server)
    return start


def test_monitor_status_tells_the_truth_about_workers(monitored):
    server, monitor = monitored('workers = 3\nthreads = 2\n')
    for _ in range(5):
        server.request('/')
    wait_until(lambda: sum(w['requests'] for w in json.loads(ask(monitor, b'status\n'))['workers']) == 5,
               message='request counts from the heartbeats')
    status = json.loads(ask(monitor, b'status\n'))
    assert status['pid'] == server.pid
    assert status['listening'] == f'http://127.0.0.1:{server.port}'
    assert status['registration']['state'] == 'off'
    assert {w['pid'] for w in status['workers']} == server.worker_pids()
    assert sorted(w['slot'] for w in status['workers']) == [0, 1, 2]
    for worker in status['workers']:
        assert worker['state'] == 'ready'
        assert worker['rss'] == pytest.approx(psutil.Process(worker['pid']).memory_info().rss, rel=0.2)
    table = ask(monitor, b'workers\n').splitlines()
    assert table[0].split()[:3] == ['slot', 'pid', 'state']
    assert {int(line.split()[1]) for line in table[1:]} == server.worker_pids()


def test_monitor_help_unknown_and_control_commands(monitored):
    server, monitor = monitored('workers = 1\n')
    help_text = ask(monitor, b'help\n')
    for command in ('help', 'status', 'workers', 'reload', 'ttin', 'ttou'):
        assert command in help_text
    assert ask(monitor, b'frobnicate now\n') == "error: unknown command 'frobnicate'; 'help' lists the commands\n"
    assert ask(monitor, b'status extra args\n') == \
        "error: status does not take 2 argument(s); 'help' lists the commands\n"
    old = server.worker_pids()
    ask(monitor, b'ttin\n')
    wait_until(lambda: len(server.worker_pids()) == 2, message='a second worker')
    ask(monitor, b'reload\n')
    wait_until(lambda: len(server.worker_pids()) == 2 and not server.worker_pids() & old,
               message='reloaded workers')


def test_monitor_survives_garbage_silence_and_crowds(monitored):
    server, monitor = monitored('workers = 1\n')
    assert ask(monitor, b'x' * 100000).startswith('error: a command line is at most 1024 bytes')
    assert ask(monitor, b'\x00\xff\xfe garbage\n').startswith('error: unknown command')
    assert ask(monitor, b'\n') == "error: no command; try 'help'\n"
    silent = [socket.create_connection(monitor) for _ in range(40)]
    try:
        # The master loop and the HTTP service go on while 40 clients say nothing.
        assert server.request('/')[0] == 200
        started = time.monotonic()
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(100) == b''  # closed by the server: busy or timed out
        assert time.monotonic() - started < 10
    finally:
        for sock in silent:
            sock.close()
    assert json.loads(ask(monitor, b'status\n'))['pid'] == server.pid


def test_monitor_plugin_from_an_entry_point(monitored, tmp_path):
    (tmp_path / 'hello_plugin.py').write_text(
        'def hello(connection, name="world"):\n'
        '    connection.write("hello %s from %d\\n" % (name, connection.status()["pid"]))\n')
    dist_info = tmp_path / 'hello_plugin-1.0.dist-info'
    dist_info.mkdir()
    (dist_info / 'METADATA').write_text('Metadata-Version: 2.1\nName: hello-plugin\nVersion: 1.0\n')
    (dist_info / 'entry_points.txt').write_text('[zkprefork.monitor]\nhello = hello_plugin:hello\n')
    server, monitor = monitored(env={'PYTHONPATH': str(tmp_path)})
    assert 'hello' in ask(monitor, b'help\n')
    assert ask(monitor, b'hello zkprefork\n') == f'hello zkprefork from {server.pid}\n'


def test_monitor_address_in_node_data(servers, ini, zookeeper, zk, zk_path):
    config = ini(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nmonitor_server = :0\n')
    server = servers(config).wait_serving()
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the nodes')
    for child in zk.get_children(zk_path):
        monitor = node_data(zk, f'{zk_path}/{child}')['monitor']
        host, port = monitor.rsplit(':', 1)
        assert host and host != '0.0.0.0' and int(port) > 0
        assert json.loads(ask(('127.0.0.1', int(port)), b'status\n'))['pid'] == server.pid


def test_busy_monitor_port_is_a_clear_error(servers, ini):
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = servers(ini(f'host = 127.0.0.1\nmonitor_server = 127.0.0.1:{port}\n'))
        assert server.wait(15) == 2
    assert server.log() == f'zkprefork: error: monitor_server: port: 127.0.0.1:{port} is already in use\n'


def test_lower_case_level_and_zconfig_loggers(servers, ini, tmp_path):
    debug = servers(ini('host = 127.0.0.1\nloggers = debug\n')).wait_serving()
    assert ' DEBUG ' in debug.log()
    debug.signal(signal.SIGTERM)
    debug.wait(15)
    logfile = tmp_path / 'zkprefork.log'
    config = ini(f'''\
        host = 127.0.0.1
        loggers =
          <logger>
            level WARNING
            <logfile>
              path {logfile}
              format [$$(levelname)s] $$(name)s: $$(message)s
            </logfile>
          </logger>
        ''')
    servers(config)
    wait_until(lambda: logfile.exists() and 'serving unregistered' in logfile.read_text(),
               message='the warning in the ZConfig log file')
    assert '[WARNING] zkprefork.master: no zookeeper option: serving unregistered' in logfile.read_text()
    assert 'INFO' not in logfile.read_text()


def test_access_log_and_usr1_reopen(servers, ini, tmp_path):
    access = tmp_path / 'access.log'
    server = servers(ini(f'host = 127.0.0.1\nworkers = 2\naccess_log = {access}\n')).wait_serving()
    server.request('/first?x=1')
    wait_until(lambda: access.exists() and 'GET /first?x=1 HTTP/1.1" 200' in access.read_text(),
               message='the access line')
    line = access.read_text().splitlines()[0]
    assert line.startswith('127.0.0.1 - ')
    rotated = tmp_path / 'access.log.1'
    access.rename(rotated)
    server.signal(signal.SIGUSR1)
    server.wait_for_log('SIGUSR1: reopening log files')
    wait_until(lambda: access.exists(), message='the master to reopen')

    def every_worker_reopened():
        # Connection: close spreads the requests; each worker writes its own line.
        server.request('/second')
        return access.exists() and access.read_text().count('/second') >= 4
    wait_until(every_worker_reopened, message='new lines in the new file')
    assert '/second' not in rotated.read_text()
    assert len(server.worker_pids()) == 2  # USR1 killed nobody


def test_zservertracelog_writes_trace_lines(servers, ini):
    pytest.importorskip('zc.zservertracelog')
    server = servers(ini('host = 127.0.0.1\nzservertracelog = true\n')).wait_serving()
    server.request('/traced?a=b')
    wait_until(lambda: ' E ' in server.log(), message='the E trace line')
    codes = [line.split('zc.tracelog[')[1].split()[1] for line in server.log().splitlines()
             if 'zc.tracelog[' in line]
    assert codes == ['B', 'I', 'C', 'A', 'E']
    assert 'GET /traced?a=b' in server.log()


def title(process):
    """What ps shows: psutil splits a title that overran the original
    argv area on spaces, and pads one that did not with empty strings."""
    return ' '.join(part for part in process.cmdline() if part)


def test_process_titles(servers, ini, zookeeper, zk_path):
    config = ini(f'host = 127.0.0.1\nworkers = 2\nzookeeper = {zookeeper.hosts}\npath = {zk_path}\n')
    server = servers(config).wait_serving()
    assert title(psutil.Process(server.pid)) == f'zkprefork: master {config} 127.0.0.1:{server.port}'
    expected = [f'zkprefork: registrar {zk_path}',
                f'zkprefork: worker 0 {config}', f'zkprefork: worker 1 {config}']
    # The registrar names itself once its interpreter has started.
    wait_until(lambda: sorted(title(child) for child in server.children()) == expected,
               message=f'titles {expected}')


def test_pidfile_life_cycle(servers, ini, tmp_path):
    pidfile = tmp_path / 'run' / 'zkprefork.pid'
    pidfile.parent.mkdir()
    pidfile.write_text('999999\n')  # stale: no such process
    config = ini(f'host = 127.0.0.1\npidfile = {pidfile}\n')
    server = servers(config).wait_serving()
    assert pidfile.read_text() == f'{server.pid}\n'
    second = servers(config)
    assert second.wait(15) == 2
    assert second.log() == (f"zkprefork: error: pidfile: '{pidfile}' names a running "
                            f'zkprefork master (pid {server.pid})\n')
    assert pidfile.read_text() == f'{server.pid}\n'
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert not pidfile.exists()
    assert os.listdir(pidfile.parent) == []


def test_systemd_notify_messages(servers, ini, zookeeper, zk_path, tmp_path):
    address = str(tmp_path / 'notify.sock')
    messages = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(0.2)

        def collect(until):
            wait_until(lambda: _receive(notify, messages) or until in messages, timeout=20,
                       message=until)
        config = ini(f'host = 127.0.0.1\nworkers = 2\nzookeeper = {zookeeper.hosts}\npath = {zk_path}\n')
        server = servers(config, env={'NOTIFY_SOCKET': address})
        collect('READY=1')
        ready_status = [m for m in messages if m.startswith('STATUS=')][-1]
        assert 'running: 2 worker(s) serving' in ready_status and 'registered as' in ready_status
        server.signal(signal.SIGHUP)
        collect('RELOADING=1')
        messages.remove('READY=1')
        collect('READY=1')
        server.signal(signal.SIGTERM)
        collect('STOPPING=1')
        assert server.wait(15) == 0
    order = [m for m in messages if m in ('READY=1', 'RELOADING=1', 'STOPPING=1')]
    assert order == ['RELOADING=1', 'READY=1', 'STOPPING=1']
    assert any(m.startswith('MONOTONIC_USEC=') for m in messages)
    for child in psutil.Process().children(recursive=True):
        assert 'NOTIFY_SOCKET' not in child.environ()


def _receive(sock, messages):
    try:
        messages.extend(sock.recv(4096).decode().splitlines())
    except socket.timeout:
        pass
    return False


def test_socket_activation(tmp_path, ini):
    tool = shutil.which('systemd-socket-activate')
    if not tool:
        pytest.skip('systemd-socket-activate is not installed')
    port = free_port()
    config = ini('workers = 2\nport = 1\n')  # the passed socket wins over port
    process = ProcessUnderTest([tool, '-l', f'127.0.0.1:{port}', sys.executable, '-m', 'zkprefork.cli', config],
                               str(tmp_path)).start()
    try:
        wait_until(lambda: _connects(port), message='systemd-socket-activate to listen')
        responses = []
        client = threading.Thread(target=lambda: responses.append(_get(port)))
        client.start()  # the first connection makes it exec zkprefork
        client.join(20)
        assert responses and responses[0].startswith(b'HTTP/1.1 200')
        process.wait_for_log('serving the socket passed by systemd')
        assert psutil.Process(process.pid).cmdline()[0].startswith('zkprefork: master')
        process.signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        process.kill()


def _connects(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def _get(port):
    with socket.create_connection(('127.0.0.1', port), timeout=15) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        answer = b''
        while chunk := sock.recv(65536):
            answer += chunk
    return answer
