"""A WSGI server real applications can run on: clients that leave, bounded
output, streaming and chunked responses, chunked request bodies,
Content-Length enforced, PEP 3333 (write(), latin-1, wsgi.file_wrapper,
REMOTE_PORT, RAW_URI, `//` paths), HTTP/1.0 keep-alive, 204 and 304,
forwarded_allow_ips. Real zkprefork workers (2 x 4 threads) serving
tests/wsgiapp.py, spoken to over raw sockets.
"""
import json
import os
import socket
import time
import uuid

import psutil
import pytest

from support import wait_until
from test_http_strict import start_app_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope='module')
def wsgi_server(tmp_path_factory):
    """One server for the module's tests (those with options start their own)."""
    server = start_app_server(tmp_path_factory.mktemp('wsgi'), 'wsgiapp')
    try:
        yield server
    finally:
        server.stop()


def app_log(server):
    try:
        with open(server.app_log) as file:
            return file.read().split('\n')
    except FileNotFoundError:
        return []


def assert_healthy(server):
    assert server.process.poll() is None, server.log()
    assert server.worker_pids() == server.workers_at_start, f'a worker was replaced:\n{server.log()}'
    assert 'crashed' not in server.log() and 'uncaptured python exception' not in server.log(), server.log()


def temp_files(server):
    """Temporary files the workers hold open (zope.server spooled output to them)."""
    found = []
    for pid in server.worker_pids():
        found += [f.path for f in psutil.Process(pid).open_files()
                  if 'zope_server_buffer' in f.path or f.path.endswith('(deleted)')]
    return found


def connect(server, rcvbuf=None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(('127.0.0.1', server.port))
    return sock


def get(path, version='1.1', headers=''):
    host = 'Host: x\r\n' if version == '1.1' else ''
    return f'GET {path} HTTP/{version}\r\n{host}{headers}\r\n'.encode()


class Reader:
    """Responses off one connection: Content-Length, chunked or until the end."""

    def __init__(self, sock):
        # A bytearray: appending to bytes copies it, and a 50 MB body read
        # 64 KiB at a time took half a minute.
        self.sock, self.buffer = sock, bytearray()

    def more(self):
        data = self.sock.recv(65536)
        self.buffer += data
        return data

    def until(self, marker):
        while marker not in self.buffer:
            if not self.more():
                raise EOFError(f'closed before {marker!r}: {self.buffer[-200:]!r}')
        at = self.buffer.index(marker)
        head = bytes(self.buffer[:at])
        del self.buffer[:at + len(marker)]
        return head

    def exactly(self, size):
        while len(self.buffer) < size:
            if not self.more():
                raise EOFError(f'closed after {len(self.buffer)} of {size} bytes')
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def head(self):
        lines = self.until(b'\r\n\r\n').decode('latin-1').split('\r\n')
        assert lines[0].startswith('HTTP/1.'), f'not a status line: {lines[0][:80]!r}'
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(':')
            headers[name.lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def chunks(self):
        """The chunks of a chunked body, as they come; stops at the last chunk."""
        while True:
            size = int(self.until(b'\r\n'), 16)
            if not size:
                assert self.until(b'\r\n') == b''
                return
            yield self.exactly(size)
            assert self.exactly(2) == b'\r\n'

    def response(self):
        status, headers = self.head()
        if headers.get('transfer-encoding') == 'chunked':
            body = b''.join(self.chunks())
        elif 'content-length' in headers:
            body = self.exactly(int(headers['content-length']))
        elif status in (204, 304):
            body = b''
        else:
            while self.more():
                pass
            body = bytes(self.buffer)
            self.buffer.clear()
        return status, headers, body

    def closed(self):
        try:
            return self.buffer == b'' and self.sock.recv(1) == b''
        except ConnectionResetError:
            return True


def still_open(reader, server):
    """The connection carries another request."""
    reader.sock.sendall(get('/stream?n=1'))
    status, _, body = reader.response()
    return status == 200 and body == b'piece 0\n'


# -- 1. a client that leaves is noticed; buffered output is bounded --

@pytest.mark.parametrize('goodbye', ['FIN', 'RST'])
def test_an_endless_stream_stops_when_its_client_leaves(wsgi_server, goodbye):
    token = uuid.uuid4().hex[:12]
    sock = connect(wsgi_server)
    sock.sendall(get(f'/endless?id={token}&ms=50'))
    reader = Reader(sock)
    assert reader.head()[0] == 200
    reader.exactly(200)  # it streams
    if goodbye == 'RST':
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
    left = time.monotonic()
    sock.close()
    wait_until(lambda: f'closed {token}' in app_log(wsgi_server), timeout=5, message='close() of the stream')
    assert time.monotonic() - left < 1.0
    assert temp_files(wsgi_server) == []
    assert_healthy(wsgi_server)


def test_a_slow_reader_holds_back_the_application_instead_of_a_temp_file(wsgi_server):
    # 64 MiB made in 64 KiB blocks for a client that reads nothing: the
    # application waits once the output buffer is past its high-water mark
    # (4 MiB), and nothing is spooled to /tmp.
    token = uuid.uuid4().hex[:12]
    with connect(wsgi_server, rcvbuf=65536) as sock:
        sock.sendall(get(f'/generated?id={token}&mb=64'))
        time.sleep(1.5)
        made = app_log(wsgi_server).count(f'block {token}') * 65536
        assert made < 16 << 20, f'{made >> 20} MiB made for a client that read nothing'
        assert temp_files(wsgi_server) == []
        reader = Reader(sock)
        status, headers, body = reader.response()  # then it reads it all
        assert status == 200 and body == b'g' * (64 << 20)
    assert_healthy(wsgi_server)


def established(server):
    """The workers' established connections on the server's port."""
    return [c for pid in server.worker_pids() for c in psutil.Process(pid).net_connections('tcp')
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port]


def test_a_client_that_reads_nothing_for_send_timeout_is_dropped(tmp_path):
    server = start_app_server(tmp_path, 'wsgiapp', 'send_timeout = 1\noutbuf_high_watermark = 65536\n')
    token = uuid.uuid4().hex[:12]
    try:
        with connect(server, rcvbuf=65536) as sock:
            sock.sendall(get(f'/generated?id={token}&mb=256'))
            start = time.monotonic()
            wait_until(lambda: f'closed {token}' in app_log(server), timeout=15, message='close() of the response')
            assert time.monotonic() - start > 0.9
            assert app_log(server).count(f'block {token}') < 256 * 16
            # Dropped: the connection too, not only the application's
            # response (its output waited for a client that never reads).
            wait_until(lambda: not established(server), timeout=5, message='the connection to end')
        assert_healthy(server)
    finally:
        server.stop()


def test_a_response_left_waiting_for_a_client_that_reads_nothing_is_dropped(tmp_path):
    """The whole response fits the output buffer (the thread is free at
    once), but the client reads none of it: after send_timeout the
    connection is reset, and its buffer freed."""
    server = start_app_server(tmp_path, 'wsgiapp', 'send_timeout = 1\n')
    try:
        with connect(server, rcvbuf=65536) as sock:
            sock.sendall(get(f'/generated?id={uuid.uuid4().hex[:12]}&mb=4'))
            wait_until(lambda: established(server), timeout=5, message='the connection')
            wait_until(lambda: not established(server), timeout=5, message='the connection to end')
        assert_healthy(server)
    finally:
        server.stop()


def test_one_large_piece_to_a_slow_reader_is_not_spooled_either(wsgi_server):
    with connect(wsgi_server, rcvbuf=65536) as sock:
        sock.sendall(get('/one-piece?mb=40'))
        time.sleep(1)
        assert temp_files(wsgi_server) == []
        status, headers, body = Reader(sock).response()
        assert status == 200 and body == b'o' * (40 << 20)
    assert_healthy(wsgi_server)


# -- 2. streaming: pieces go out as they are made; chunked for HTTP/1.1 --

def test_server_sent_events_arrive_when_they_are_yielded(wsgi_server):
    with connect(wsgi_server) as sock:
        start = time.monotonic()
        sock.sendall(get('/events?n=3&ms=500'))
        reader = Reader(sock)
        status, headers = reader.head()
        assert status == 200 and headers['transfer-encoding'] == 'chunked'
        arrivals = []
        for chunk in reader.chunks():
            arrivals.append(time.monotonic() - start)
            assert chunk.startswith(b'data: %d ' % (len(arrivals) - 1))
        assert len(arrivals) == 3
        for i, arrival in enumerate(arrivals):
            assert i * 0.5 - 0.05 < arrival < i * 0.5 + 0.3, arrivals
        assert still_open(reader, wsgi_server)


def test_a_response_without_content_length_is_chunked_and_keeps_the_connection(wsgi_server):
    with connect(wsgi_server) as sock:
        reader = Reader(sock)
        for n in (0, 1, 5, 200):
            sock.sendall(get(f'/stream?n={n}'))
            status, headers, body = reader.response()
            assert status == 200 and headers['transfer-encoding'] == 'chunked'
            assert 'connection' not in headers
            assert body == b''.join(b'piece %d\n' % i for i in range(n))


def test_http_1_0_without_content_length_ends_with_the_connection(wsgi_server):
    with connect(wsgi_server) as sock:
        sock.sendall(get('/stream?n=3', version='1.0'))
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert 'transfer-encoding' not in headers and headers['connection'] == 'close'
        assert body == b'piece 0\npiece 1\npiece 2\n'


def test_an_exception_in_a_stream_leaves_the_chunked_body_unterminated(wsgi_server):
    with connect(wsgi_server) as sock:
        sock.sendall(get('/raise-in-stream'))
        reader = Reader(sock)
        status, headers = reader.head()
        assert status == 200 and headers['transfer-encoding'] == 'chunked'
        with pytest.raises(EOFError):
            list(reader.chunks())
        assert b'0\r\n\r\n' not in reader.buffer
    wait_until(lambda: 'failing in the middle of a stream' in wsgi_server.log(), timeout=5,
               message="the application's error in the log")
    assert_healthy(wsgi_server)


# -- 3. chunked request bodies reach the application --

@pytest.mark.parametrize('chunks', [[b'hello'], [b'a' * 100, b'b' * 70000, b'c'], [b'\r\n0\r\n\r\n', b'x']],
                         ids=['one', 'several', 'framing-like-data'])
def test_a_chunked_request_body_is_read_whole(wsgi_server, chunks):
    body = b''.join(b'%x\r\n%s\r\n' % (len(chunk), chunk) for chunk in chunks) + b'0\r\n\r\n'
    with connect(wsgi_server) as sock:
        sock.sendall(b'POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n' + body)
        status, _, answer = Reader(sock).response()
    seen = json.loads(answer)
    assert status == 200 and seen['body'].encode('latin-1') == b''.join(chunks)
    assert seen['CONTENT_LENGTH'] == str(len(b''.join(chunks))) and seen['wsgi.input_terminated'] is True


def test_a_chunked_request_body_over_the_limit_is_413(tmp_path):
    server = start_app_server(tmp_path, 'wsgiapp', 'max_request_body_size = 100\n')
    try:
        with connect(server) as sock:
            sock.sendall(b'POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
                         + b'40\r\n' + b'a' * 64 + b'\r\n' + b'40\r\n' + b'b' * 64 + b'\r\n0\r\n\r\n')
            assert Reader(sock).response()[0] == 413
    finally:
        server.stop()


# -- 4. Content-Length is enforced on responses --

def test_fewer_bytes_than_content_length_close_the_connection(wsgi_server):
    with connect(wsgi_server) as sock:
        sock.sendall(get('/length?declared=100&sent=10'))
        reader = Reader(sock)
        reader.head()
        with pytest.raises(EOFError, match='after 10 of 100'):
            reader.exactly(100)


def test_more_bytes_than_content_length_are_never_sent(wsgi_server):
    with connect(wsgi_server) as sock:
        sock.sendall(get('/length?declared=5&sent=20'))
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert body == b'xxxxx'
        assert still_open(reader, wsgi_server)  # the next response is not garbage


# -- 5. PEP 3333 --

def test_the_write_callable(wsgi_server):
    with connect(wsgi_server) as sock:
        sock.sendall(get('/write'))
        assert Reader(sock).response()[2] == b'written, returned\n'


def test_header_values_are_latin_1(wsgi_server):
    with connect(wsgi_server) as sock:
        sock.sendall(get('/header?value=caf%C3%A9'))  # 'café'
        head = Reader(sock).until(b'\r\n\r\n')
    assert b'\r\nX-Value: caf\xe9' in head  # not UTF-8's caf\xc3\xa9


def test_a_header_value_beyond_latin_1_is_a_500(wsgi_server):
    with connect(wsgi_server) as sock:
        sock.sendall(get('/header?value=%E2%82%AC'))  # '€'
        assert Reader(sock).response()[0] == 500
    wait_until(lambda: "'latin-1' codec can't encode" in wsgi_server.log(), timeout=5,
               message="the application's error in the log")


def workers_written(server):
    """Bytes the workers wrote with write(2) or sendfile(2), /proc/PID/io's
    wchar: Linux counts sendfile(2) there, and not a socket's send(2)."""
    return sum(psutil.Process(pid).io_counters().write_chars for pid in server.worker_pids())


def test_file_wrapper_sends_a_file_with_sendfile(wsgi_server, tmp_path):
    path = tmp_path / 'fifty.bin'
    block = os.urandom(1 << 20)
    path.write_bytes(block * 50)
    written = {}
    for how in ('copy=1&', ''):
        with connect(wsgi_server) as sock:
            before = workers_written(wsgi_server)
            sock.sendall(get(f'/file?{how}path={path}'))
            status, headers, body = Reader(sock).response()
            written[how or 'sendfile'] = workers_written(wsgi_server) - before
        assert status == 200 and len(body) == 50 << 20 and body == block * 50
    # The copy is read and sent with send(2); sendfile(2) moves the file in
    # the kernel (bench/RESULTS.md: 5-10 times less worker CPU on a quiet machine).
    assert written['copy=1&'] < 1 << 20 and written['sendfile'] >= 50 << 20, written


def test_file_wrapper_reads_what_is_not_a_file_in_blocks(wsgi_server):
    with connect(wsgi_server) as sock:
        reader = Reader(sock)
        sock.sendall(get('/file-like'))
        status, headers, body = reader.response()
        assert status == 200 and headers['transfer-encoding'] == 'chunked'
        assert body == b'not a file ' * 1000
        assert still_open(reader, wsgi_server)


def test_remote_port_raw_uri_and_double_slash_paths(wsgi_server):
    with connect(wsgi_server) as sock:
        reader = Reader(sock)
        sock.sendall(get('/a%20b/env?x=%20'))
        env = json.loads(reader.response()[2])
        assert env['REMOTE_PORT'] == str(sock.getsockname()[1])
        assert env['RAW_URI'] == env['REQUEST_URI'] == '/a%20b/env?x=%20'
        assert env['PATH_INFO'] == '/a b/env'
        # zope.server read //x/y as a host x and the path /y
        sock.sendall(get('//x/env'))
        assert json.loads(reader.response()[2])['PATH_INFO'] == '//x/env'


# -- 6. keep-alive kept where it can be --

def test_http_1_0_keep_alive_with_content_length(wsgi_server):
    with connect(wsgi_server) as sock:
        reader = Reader(sock)
        for _ in range(3):
            sock.sendall(get('/length?declared=3&sent=3', version='1.0', headers='Connection: keep-alive\r\n'))
            status, headers, body = reader.response()
            assert body == b'xxx' and headers['connection'] == 'Keep-Alive'
        sock.sendall(get('/length?declared=3&sent=3', version='1.0'))
        assert reader.response()[1]['connection'] == 'close'
        assert reader.closed()


@pytest.mark.parametrize('code', [204, 304])
def test_204_and_304_keep_the_connection(wsgi_server, code):
    with connect(wsgi_server) as sock:
        reader = Reader(sock)
        sock.sendall(get(f'/status?code={code}'))
        status, headers, body = reader.response()
        assert status == code and 'connection' not in headers and 'transfer-encoding' not in headers
        assert still_open(reader, wsgi_server)


# -- 7. forwarded_allow_ips (gunicorn's name and meaning) --

FORWARDED = 'X-Forwarded-For: 6.6.6.6, 192.0.2.7\r\nX-Forwarded-Proto: https\r\n'


def test_forwarded_headers_from_an_allowed_peer_set_the_scheme_and_address(wsgi_server):
    # The default, 127.0.0.1: the test client is a trusted proxy.
    with connect(wsgi_server) as sock:
        sock.sendall(get('/env', headers=FORWARDED))
        env = json.loads(Reader(sock).response()[2])
    assert env['wsgi.url_scheme'] == 'https'
    assert env['REMOTE_ADDR'] == '192.0.2.7'  # what the proxy saw, not what the client claimed


@pytest.mark.parametrize('allowed,trusted', [('10.0.0.1', False), ('10.0.0.0/8, ::1', False),
                                             ('127.0.0.0/8', True), ('*', True)])
def test_forwarded_allow_ips_decides_whose_forwarded_headers_count(tmp_path, allowed, trusted):
    server = start_app_server(tmp_path, 'wsgiapp', f'forwarded_allow_ips = {allowed}\n')
    try:
        with connect(server) as sock:
            sock.sendall(get('/env', headers=FORWARDED))
            env = json.loads(Reader(sock).response()[2])
    finally:
        server.stop()
    expected = ('https', '192.0.2.7') if trusted else ('http', '127.0.0.1')
    assert (env['wsgi.url_scheme'], env['REMOTE_ADDR']) == expected
    assert env['HTTP_X_FORWARDED_FOR'] == '6.6.6.6, 192.0.2.7'
