"""Issue 18, item 5: a full disk is the server's failure, not the client's.

A real zkprefork (1 worker, tests/httpapp.py) whose TMPDIR (where bodies
past 512 KiB are spooled) and access log are on a 2 MiB tmpfs of the
test's own, which the test fills up. A 1 MiB upload must then be answered
507 (not 400), logged once with its cause, the worker must keep serving,
and the access log's failing writes must not print a traceback per request.
Needs root (mount); the tmpfs is unmounted once the server is gone.
"""
import errno
import http.client
import os
import socket
import subprocess

import pytest

from support import wait_until

pytestmark = pytest.mark.timeout(60)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
UPLOAD = b'\xab' * (1 << 20)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs; requested before `servers`, so unmounted after the server is killed."""
    mountpoint = tmp_path / 'disk'
    mountpoint.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f'cannot mount a tmpfs: {mounted.stderr.strip()}')
    yield mountpoint
    if subprocess.run(['umount', str(mountpoint)]).returncode:
        subprocess.run(['umount', '-l', str(mountpoint)], check=True)


@pytest.fixture
def disk_server(small_disk, servers, ini, tmp_path):
    (small_disk / 'tmp').mkdir()
    config = ini(f'host = 127.0.0.1\nworkers = 1\nthreads = 2\naccess_log = {small_disk}/access.log\n',
                 app='call:httpapp:factory')
    pythonpath = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get('PYTHONPATH')]))
    server = servers(config, env={'PYTHONPATH': pythonpath, 'TMPDIR': str(small_disk / 'tmp'),
                                  'HTTPAPP_CLOSE_LOG': str(tmp_path / 'closed.log')})
    server.wait_serving()
    server.workers_at_start = wait_until(server.worker_pids, message='the worker')
    server.access_log = small_disk / 'access.log'
    return server


def spool_files(server):
    """The files in the disk's TMPDIR that the worker holds open."""
    (pid,) = server.workers_at_start
    spool = str(server.access_log.parent / 'tmp') + '/'
    targets = []
    for fd in os.listdir(f'/proc/{pid}/fd'):
        try:
            targets.append(os.readlink(f'/proc/{pid}/fd/{fd}'))
        except FileNotFoundError:
            pass  # closed meanwhile
    return [target for target in targets if target.startswith(spool)]


def fill(directory):
    """Write a file in `directory` until the file system has no room left."""
    with open(directory / 'filler', 'wb', buffering=0) as file:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    file.write(b'\0' * size)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
    return directory / 'filler'


def upload(server, expect_continue=False):
    """POST /echo with UPLOAD on a connection of its own: (status, headers, body)."""
    with socket.create_connection(('127.0.0.1', server.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        expect = b'Expect: 100-continue\r\n' if expect_continue else b''
        sock.sendall(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n' % (len(UPLOAD), expect))
        response = http.client.HTTPResponse(sock)
        if expect_continue:
            assert sock.recv(25) == b'HTTP/1.1 100 Continue\r\n\r\n'
        try:
            sock.sendall(UPLOAD)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the end of the body: the answer came first
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


def get(server, count=1):
    """`count` GETs / on one connection: the (status, body) of each."""
    connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
    answers = []
    try:
        for _ in range(count):
            connection.request('GET', '/')
            response = connection.getresponse()
            answers.append((response.status, response.read()))
        return answers
    finally:
        connection.close()


def lines_with(server, *words):
    return [line for line in server.log().splitlines() if all(word in line for word in words)]


@pytest.mark.parametrize('expect_continue', [False, True], ids=['whole', '100-continue'])
def test_an_upload_to_a_full_disk_is_507_logged_once_and_the_worker_serves_on(disk_server, expect_continue):
    server = disk_server
    assert upload(server, expect_continue)[::2] == (200, UPLOAD)  # spooled on that disk while there is room
    wait_until(lambda: not spool_files(server), message='the spool file closed')  # else its room comes back
    filler = fill(server.access_log.parent)

    for _ in range(2):
        status, headers, body = upload(server, expect_continue)
        assert status == 507, (status, body)
        assert headers['Connection'] == 'close' and b'No space' not in body  # the cause is the log's, not the client's
    # The access log's last page fills up after some 40 lines: then every
    # line fails to be written.
    assert get(server, 100) == [(200, b'Hello, World!\n')] * 100

    log = server.log()
    assert len(lines_with(server, 'cannot store the request body of POST /echo', 'No space left on device')) == 2, log
    # The access log failed on every request after some 40: reported once, no traceback.
    assert len(lines_with(server, str(server.access_log), 'No space left on device')) == 1, log
    assert 'Traceback' not in log and 'Logging error' not in log, log
    assert server.worker_pids() == server.workers_at_start, f'the worker was replaced:\n{log}'

    filler.unlink()  # room again: uploads are served, and the access log is written again
    assert upload(server, expect_continue)[::2] == (200, UPLOAD)
    assert get(server) == [(200, b'Hello, World!\n')]
    wait_until(lambda: '"GET / HTTP/1.1" 200' in server.access_log.read_text()
               and lines_with(server, f'log records are written to {server.access_log} again'),
               message='the access log written again, and that said')
    assert server.worker_pids() == server.workers_at_start, f'the worker was replaced:\n{server.log()}'
