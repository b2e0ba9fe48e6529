"""Issue 18, item 4: a connection that ends in the middle of a large request
body releases what it holds (the body's spool file above all) when it ends,
however it ends, without waiting for the garbage collector.

A real zkprefork (1 worker, tests/httpapp.py) spools bodies past 512 KiB
to temporary files in a TMPDIR of the test's own; 20 clients each send
1 MiB of a 4 MB body and go. The worker's open file descriptors
(/proc/PID/fd) then show whether the spool files, unlinked at creation,
are still held open as "... (deleted)". Nothing here forces a collection:
the worker's own garbage collector runs as it would in production.
"""
import http.client
import os
import socket
import struct
import time

import pytest

from support import wait_until

pytestmark = pytest.mark.timeout(90)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CLIENTS = 20
DECLARED = 4_000_000   # the Content-Length each client announces
SENT = 1 << 20         # the bytes of it each client sends before it goes
RST = struct.pack('ii', 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


@pytest.fixture
def upload_server(servers, ini, tmp_path, request):
    """A served httpapp, 1 worker, spooling in a TMPDIR of its own; options
    overridden by an indirect parameter (a request_read_timeout of a few
    seconds lets the server itself end stalled uploads once all 20 are in)."""
    spool = tmp_path / 'spool'
    spool.mkdir()
    options = {'host': '127.0.0.1', 'workers': 1, 'threads': 2, 'request_read_timeout': 30,
               **getattr(request, 'param', {})}
    config = ini(''.join(f'{name} = {value}\n' for name, value in options.items()), app='call:httpapp:factory')
    pythonpath = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get('PYTHONPATH')]))
    server = servers(config, env={'PYTHONPATH': pythonpath, 'TMPDIR': str(spool),
                                  'HTTPAPP_CLOSE_LOG': str(tmp_path / 'closed.log')})
    server.wait_serving()
    (server.worker,) = wait_until(server.worker_pids, message='the worker')
    server.spool = str(spool)
    return server


def spool_files(server):
    """{fd: size} of the spool files (unlinked, in the test's TMPDIR) the worker holds open."""
    held = {}
    fds = f'/proc/{server.worker}/fd'
    for fd in os.listdir(fds):
        try:
            target = os.readlink(f'{fds}/{fd}')
            if target.startswith(server.spool + '/') and target.endswith(' (deleted)'):
                held[fd] = os.stat(f'{fds}/{fd}').st_size
        except FileNotFoundError:
            pass  # closed meanwhile
    return held


def start_upload(server, expect_continue=False):
    sock = socket.create_connection(('127.0.0.1', server.port), timeout=10)
    # (A client may send the body without waiting for 100 Continue, RFC
    # 9110 10.1.1: 20 of them need not wait for the worker's 2 threads.)
    expect = 'Expect: 100-continue\r\n' if expect_continue else ''
    sock.sendall(f'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {DECLARED}\r\n{expect}\r\n'.encode())
    sock.sendall(b'u' * SENT)
    return sock


def get_requests(server, count):
    """`count` GETs on one keep-alive connection (work, and allocations, for the worker)."""
    connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
    try:
        for _ in range(count):
            connection.request('GET', '/')
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, b'Hello, World!\n')
    finally:
        connection.close()


def assert_released(server):
    """Every spool file is closed within 3 s, while 200 other requests are served."""
    deadline = time.monotonic() + 3
    get_requests(server, 200)
    while spool_files(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    held = spool_files(server)
    assert not held, (f'{len(held)} spool files ({sum(held.values())} bytes) still open '
                      f'in the worker after 3 s and 200 requests')
    assert server.worker_pids() == {server.worker}, f'the worker was replaced:\n{server.log()}'


def hold_uploads(server, expect_continue=False):
    """20 uploads under way, each with its spool file of (about) SENT bytes."""
    socks = [start_upload(server, expect_continue) for _ in range(CLIENTS)]
    nearly = SENT - (64 << 10)  # the last bytes may still be in the file's write buffer
    try:
        wait_until(lambda: len([size for size in spool_files(server).values() if size >= nearly]) == CLIENTS,
                   message=f'{CLIENTS} spool files of {SENT} bytes in the worker')
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


@pytest.mark.parametrize('goodbye', ['close', 'reset'])
def test_uploads_the_clients_abort_release_their_spool_files(upload_server, goodbye):
    socks = hold_uploads(upload_server)
    for sock in socks:
        if goodbye == 'reset':
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        sock.close()
    assert_released(upload_server)
    assert 'Traceback' not in upload_server.log(), upload_server.log()


@pytest.mark.parametrize('upload_server', [{'request_read_timeout': 4}], indirect=True)
def test_uploads_the_server_ends_with_408_release_their_spool_files(upload_server):
    socks = hold_uploads(upload_server)
    try:
        for sock in socks:  # silent for request_read_timeout: the server answers 408 and closes
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 408
        assert_released(upload_server)
    finally:
        for sock in socks:
            sock.close()
    assert 'Traceback' not in upload_server.log(), upload_server.log()


def test_aborted_uploads_the_application_was_reading_release_their_spool_files(upload_server):
    # With 100-continue the application reads the body as it arrives: the
    # client's going fails its read, and the spool file goes all the same.
    socks = hold_uploads(upload_server, expect_continue=True)
    for sock in socks:
        sock.close()
    assert_released(upload_server)


@pytest.mark.parametrize('upload_server', [{'threads': CLIENTS}], indirect=True)
def test_a_continued_body_the_application_never_read_is_released(upload_server):
    # The client sends its whole body without waiting for 100 Continue, and
    # the application answers (1 s later: the bodies are in by then) without
    # reading it: the connection stays open, and the request, done with,
    # must not keep its spool file.
    socks = []
    try:
        for _ in range(CLIENTS):
            sock = socket.create_connection(('127.0.0.1', upload_server.port), timeout=10)
            socks.append(sock)
            sock.sendall(f'POST /sleep?ms=1000 HTTP/1.1\r\nHost: x\r\nContent-Length: {SENT}\r\n'
                         'Expect: 100-continue\r\n\r\n'.encode() + b'u' * SENT)
        for sock in socks:
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert (response.status, response.read(), response.will_close) == (200, b'Hello, World!\n', False)
        assert_released(upload_server)
    finally:
        for sock in socks:
            sock.close()
    assert 'Traceback' not in upload_server.log(), upload_server.log()
