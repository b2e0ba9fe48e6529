"""The zkprefork-providers command, run as its own process against a real
ZooKeeper: its output, its bad-input errors, --watch until a signal, --exec
once per burst and never two at once, and an HAProxy in front of two
zkprefork servers kept up to date by it."""
import json
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from support import Load, Processes, ProcessUnderTest, free_port, wait_until
from zkprefork.discovery.command import COALESCE
from zkprefork.testing import http_get

COMMAND = [sys.executable, '-m', 'zkprefork.discovery.command']


def run(*args, timeout=30):
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def command(tmp_path):
    """command(*args) -> the running zkprefork-providers (a ProcessUnderTest); killed at the end."""
    started = Processes()
    yield lambda *args, env=None: started.start(
        ProcessUnderTest([*COMMAND, *args], str(tmp_path), env=env, cwd=str(tmp_path), name='zkprefork-providers'))
    started.kill_all()


def json_lines(process):
    return [json.loads(line) for line in process.log().splitlines() if line.startswith('[')]


def test_one_url_per_line_and_the_full_data_as_json(zookeeper, zk, zk_path):
    zk.create(f'{zk_path}/127.0.0.1:9001', b'{"pid":1}', makepath=True, ephemeral=True)
    zk.create(f'{zk_path}/[::1]:9002', b'{"pid":2,"scheme":"https"}', ephemeral=True)
    done = run(zookeeper.hosts, zk_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, 'http://127.0.0.1:9001\nhttps://[::1]:9002\n', '')
    done = run(zookeeper.hosts, zk_path, '--json')
    assert json.loads(done.stdout) == [
        {'name': '127.0.0.1:9001', 'host': '127.0.0.1', 'port': 9001, 'scheme': 'http',
         'url': 'http://127.0.0.1:9001', 'data': {'pid': 1}},
        {'name': '[::1]:9002', 'host': '::1', 'port': 9002, 'scheme': 'https',
         'url': 'https://[::1]:9002', 'data': {'pid': 2, 'scheme': 'https'}}]
    assert run(zookeeper.hosts, zk_path + '/absent').stdout == ''


@pytest.mark.parametrize('args, message', [
    (('nohost:abc', '/p'), "zookeeper: 'nohost:abc': port 'abc' is not an integer"),
    (('127.0.0.1:2181', 'p'), "path: 'p' is not an absolute ZooKeeper path"),
    (('127.0.0.1:2181', '/p', '--format', 'xml'), "node_format: 'xml' is not one of zk, serverset, curator"),
    (('127.0.0.1:2181', '/p', '--zookeeper-credentials-file', '/nonexistent'),
     "zookeeper_credentials_file: '/nonexistent' is not a readable file"),
    (('127.0.0.1:2181',), 'the following arguments are required: PATH'),
    (('127.0.0.1:2181', '/p', '--session-timeout', 'soon'), "session_timeout: 'soon' is not an integer"),
    (('127.0.0.1:2181', '/p', '--timeout', '0'), "argument --timeout: '0' is out of range (must be more than zero"),
    (('127.0.0.1:2181', '/p', '--timeout', '-1'), "argument --timeout: '-1' is out of range"),
    (('127.0.0.1:2181', '/p', '--timeout', 'inf'), "argument --timeout: 'inf' is out of range"),
    (('127.0.0.1:2181', '/p', '--timeout', 'nan'), "argument --timeout: 'nan' is out of range"),
    (('127.0.0.1:2181', '/p', '--timeout', 'soon'), "argument --timeout: 'soon' is not a number of seconds"),
    (('127.0.0.1:2181', '/p', '--exec', ' '), 'argument --exec: an empty command'),
])
def test_bad_input_is_exit_2_with_one_line(args, message):
    done = run(*args)
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.startswith(f'zkprefork-providers: error: {message}'), done.stderr
    assert done.stderr.count('\n') == 1


def test_no_zookeeper_is_exit_1_with_one_line():
    port = free_port()
    done = run(f'127.0.0.1:{port}', '/p', '--timeout', '1')
    assert done.returncode == 1 and done.stdout == ''
    assert done.stderr.splitlines()[-1] == (
        f'zkprefork-providers: no answer from ZooKeeper at 127.0.0.1:{port} within 1.0 s')


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_watch_prints_a_json_line_per_snapshot_until_a_signal(zookeeper, zk, zk_path, command, signum):
    process = command(zookeeper.hosts, zk_path, '--watch')
    wait_until(lambda: json_lines(process) == [[]], timeout=10, message='the first snapshot')
    zk.create(f'{zk_path}/127.0.0.1:9001', b'{}', makepath=True, ephemeral=True)
    wait_until(lambda: len(json_lines(process)) == 2, timeout=5, message='the second')
    zk.delete(f'{zk_path}/127.0.0.1:9001')
    wait_until(lambda: len(json_lines(process)) == 3, timeout=5, message='the third')
    assert [[p['url'] for p in s] for s in json_lines(process)] == [[], ['http://127.0.0.1:9001'], []]
    process.signal(signum)
    assert process.wait(10) == 0


RECORD = '''\
import json, os, sys, time
log = sys.argv[1]
# O_EXCL: a second run while one is running fails loudly.
marker = os.open(log + '.running', os.O_CREAT | os.O_EXCL | os.O_WRONLY)
stdin = sys.stdin.read()
with open(os.environ['ZKPREFORK_PROVIDERS_FILE']) as file:
    assert file.read() == stdin
time.sleep(0.3)
with open(log, 'a') as file:
    file.write(json.dumps([p['url'] for p in json.loads(stdin)]) + '\\n')
os.close(marker)
os.unlink(log + '.running')
'''


def test_exec_runs_once_per_burst_never_two_at_once(zookeeper, zk, zk_path, command, tmp_path):
    (tmp_path / 'record.py').write_text(RECORD)
    log = tmp_path / 'runs'
    process = command(zookeeper.hosts, zk_path, '--exec', f'{sys.executable} record.py {log}')

    def runs():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    wait_until(lambda: runs() == [[]], timeout=10, message='the first run')
    for port in (9001, 9002, 9003):  # a burst: three changes within milliseconds
        zk.create(f'{zk_path}/127.0.0.1:{port}', b'{}', makepath=True, ephemeral=True)
    wait_until(lambda: runs() and len(runs()[-1]) == 3, timeout=10, message='a run with all three')
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert 2 <= len(runs()) <= 3, runs()
    assert 'exited with status' not in process.log()


@pytest.mark.parametrize('full', [False, True])
def test_exec_runs_for_a_new_list_not_for_new_data_unless_json(zookeeper, zk, zk_path, command, tmp_path, full):
    """A server's reload or new worker count changes its data only: a
    proxy's reload for it would cost its idle connections for nothing."""
    (tmp_path / 'record.py').write_text(RECORD)
    log = tmp_path / 'runs'
    node = f'{zk_path}/127.0.0.1:9001'
    zk.create(node, b'{"generation":0}', makepath=True, ephemeral=True)
    process = command(zookeeper.hosts, zk_path, '--exec', f'{sys.executable} record.py {log}',
                      *(['--json'] if full else []))
    runs = lambda: log.read_text().splitlines() if log.exists() else []  # noqa: E731
    wait_until(lambda: len(runs()) == 1, timeout=10, message='the first run')
    zk.set(node, b'{"generation":1}')
    zk.create(f'{zk_path}/127.0.0.1:9002', b'{}', ephemeral=True)  # a burst that ends where it began
    zk.delete(f'{zk_path}/127.0.0.1:9002')
    time.sleep(COALESCE + 1.0)
    assert len(runs()) == (2 if full else 1), runs()
    zk.create(f'{zk_path}/127.0.0.1:9003', b'{}', ephemeral=True)
    wait_until(lambda: len(runs()) == (3 if full else 2), timeout=10, message='a run for the new provider')
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0


# The README's HAProxy example (Clients), as a new user would run it.
README = pathlib.Path(__file__).parent.parent / 'README.rst'


def readme_block(introduced_by):
    """The literal block of README.rst's Clients section that follows the
    paragraph ending with `introduced_by` (which ends with '::'), dedented."""
    text = README.read_text(encoding='utf-8')
    rest = text[text.index(introduced_by) + len(introduced_by):].lstrip('\n')
    block = re.match(r'((?: {4}.*\n|\n)+)', rest).group(1)
    return textwrap.dedent(block).strip('\n') + '\n'


# The README's own example, run as it is written there.
RENDER = readme_block('``render.py``::')
TEMPLATE = readme_block('the line ``#providers``::')
RELOAD = shlex.split(readme_block('keep it up to date::').splitlines()[-1])[-1]


def answering(port, pids_by_server, count=12):
    """The servers (indexes of pids_by_server) that answered `count` GETs through HAProxy."""
    seen = set()
    for _ in range(count):
        try:
            status, body = http_get(port)
        except ConnectionRefusedError:
            return set()  # HAProxy is not listening yet
        assert status == 200, body
        pid = int(body.rpartition(b'(pid ')[2].rstrip(b')\n'))
        seen.update(index for index, pids in enumerate(pids_by_server) if pid in pids)
    return seen


def test_haproxy_in_front_of_zkprefork_servers_follows_them(zookeeper, zk_path, servers, ini, command, tmp_path):
    port = free_port()
    (tmp_path / 'render.py').write_text(RENDER)
    (tmp_path / 'haproxy.cfg.in').write_text(TEMPLATE.replace('127.0.0.1:8000', f'127.0.0.1:{port}'))
    options = f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\n'
    running = [servers(ini(options)).wait_serving() for _ in range(2)]
    wait_until(lambda: len(run(zookeeper.hosts, zk_path).stdout.split()) == 2, message='both registered')
    # Render once, start HAProxy, then keep it up to date.
    subprocess.run(f'{" ".join(COMMAND)} {zookeeper.hosts} {zk_path} --json '
                   '| python3 render.py haproxy.cfg.in haproxy.cfg', shell=True, check=True, cwd=tmp_path)
    haproxy = Processes()
    try:
        haproxy.start(ProcessUnderTest(['haproxy', '-W', '-db', '-f', 'haproxy.cfg', '-p', 'haproxy.pid'],
                                       str(tmp_path), cwd=str(tmp_path), name='haproxy'))
        watcher = command(zookeeper.hosts, zk_path, '--exec', RELOAD)
        pids = lambda: [server.worker_pids() for server in running]  # noqa: E731
        wait_until(lambda: answering(port, pids()) == {0, 1}, timeout=10, message='both servers behind HAProxy')
        with Load(port, clients=4) as load:  # keep-alive clients of HAProxy, through its reloads
            running.append(servers(ini(options)).wait_serving())
            wait_until(lambda: answering(port, pids()) == {0, 1, 2}, timeout=10, message='the third one')
            running[0].signal(signal.SIGTERM)
            wait_until(lambda: running[0].process.poll() is not None, timeout=15, message='the first to stop')
            wait_until(lambda: f'127.0.0.1:{running[0].port} ' not in (tmp_path / 'haproxy.cfg').read_text(),
                       timeout=10, message='the first out of the configuration')
        assert load.failures == [] and load.ok > 0, load.failures[:3]
        assert answering(port, pids(), count=30) == {1, 2}  # every request answered, by the others
        assert 'exited with status' not in watcher.log()
    finally:
        haproxy.stop_all()
