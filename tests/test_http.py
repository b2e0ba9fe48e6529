"""HTTP correctness of a real zkprefork (workers on zope.server), spoken to
over raw sockets: keep-alive without stalls, pipelining, slow readers, large
bodies and headers, closing, clients that vanish, concurrency, WSGI
iterables and close(), application errors, HEAD, 204 and 304.

The served application is tests/httpapp.py. Each test has a server of its
own (1 or 2 workers, 127.0.0.1, port 0), killed by the `servers` fixture,
and most end by checking that no worker was replaced and that the log holds
no traceback.
"""
import concurrent.futures
import json
import os
import socket
import struct
import time
import uuid

import pytest

import httpapp
from support import wait_until, worker_connections

pytestmark = pytest.mark.timeout(60)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10  # seconds, for every socket operation
RST = struct.pack('ii', 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def _tcp_wmem_max():
    try:
        with open('/proc/sys/net/ipv4/tcp_wmem') as file:
            return int(file.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


# A response the kernel cannot take at once (the server's send buffer grows
# up to tcp_wmem's maximum): the rest stays in the worker's output buffer,
# and it is the asyncore loop that must send it on.
BEYOND_KERNEL_BUFFERS = max(8 << 20, 2 * _tcp_wmem_max() + (1 << 20))


# -- the server --

@pytest.fixture
def http_server(servers, ini, tmp_path):
    """http_server(workers=2, threads=4) -> a serving support.Server of
    httpapp, with .close_log (the file httpapp's close() calls append to)
    and .workers_at_start (the worker pids once it served)."""
    def start(workers=2, threads=4):
        config = ini(f'host = 127.0.0.1\nworkers = {workers}\nthreads = {threads}\n',
                     app='call:httpapp:factory')
        close_log = str(tmp_path / 'closed.log')
        pythonpath = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get('PYTHONPATH')]))
        server = servers(config, env={'PYTHONPATH': pythonpath, 'HTTPAPP_CLOSE_LOG': close_log})
        server.wait_serving()
        server.close_log = close_log
        server.workers_at_start = wait_until(
            lambda: (pids := server.worker_pids()) and len(pids) == workers and pids,
            message=f'{workers} worker processes')
        return server
    return start


def assert_healthy(server, tracebacks_allowed=False):
    """The master runs, no worker died or was replaced, nothing crashed."""
    assert server.process.poll() is None, f'the master exited:\n{server.log()}'
    log = server.log()
    assert 'crashed' not in log, f'a worker crashed:\n{log}'
    workers = server.worker_pids()
    assert workers == server.workers_at_start, \
        f'workers {sorted(server.workers_at_start)} were replaced by {sorted(workers)}:\n{log}'
    if not tracebacks_allowed:
        assert 'Traceback' not in log, f'a traceback in the log:\n{log}'
        assert 'uncaptured python exception' not in log, f'an asyncore error in the log:\n{log}'


# -- the client: raw sockets, to see exactly what the server sends --

def connect(port, rcvbuf=None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
    sock.settimeout(TIMEOUT)
    sock.connect(('127.0.0.1', port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request(path, method='GET', headers=(), body=b'', version='1.1'):
    lines = [f'{method} {path} HTTP/{version}']
    if version == '1.1':
        lines.append('Host: 127.0.0.1')
    lines.extend(f'{name}: {value}' for name, value in headers)
    if body:
        lines.append(f'Content-Length: {len(body)}')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body


def get(path, **kw):
    return request(path, **kw)


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self):
        return f'<Response {self.status} {self.headers} {self.body[:60]!r}>'


class Reader:
    """Responses read off one connection, with what was read beyond them
    kept for the next one (so pipelined responses can be told apart)."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()

    def _more(self, size=65536):
        chunk = self.sock.recv(size)
        self.buffer += chunk
        return chunk

    def response(self, method='GET'):
        while b'\r\n\r\n' not in self.buffer:
            if not self._more():
                raise EOFError(f'connection closed before the headers (got {self.buffer[:200]!r})')
        head, _, self.buffer = self.buffer.partition(b'\r\n\r\n')
        lines = head.decode('latin-1').split('\r\n')
        assert lines[0].startswith('HTTP/1.'), f'not a status line: {head[:200]!r}'
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(':')
            assert colon, f'bad header line {line!r}'
            headers[name.strip().lower()] = value.strip()
        if method == 'HEAD' or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b'')
        assert 'transfer-encoding' not in headers, headers  # nothing here asks for chunking
        if 'content-length' in headers:
            length = int(headers['content-length'])
            while len(self.buffer) < length:
                if not self._more():
                    raise EOFError(f'connection closed after {len(self.buffer)} of {length} body bytes')
            body, self.buffer = bytes(self.buffer[:length]), self.buffer[length:]
        else:  # delimited by the end of the connection
            assert headers.get('connection', '').lower() == 'close', headers
            while self._more():
                pass
            body, self.buffer = bytes(self.buffer), bytearray()
        return Response(status, headers, body)

    def assert_closed(self):
        """The server closes the connection and sends nothing more."""
        data = self.sock.recv(65536)
        assert self.buffer == b'' and data == b'', f'more after the response: {bytes(self.buffer + data)[:200]!r}'

    def assert_nothing_more(self):
        """Nothing beyond the responses read so far has arrived."""
        self.sock.settimeout(0.05)
        try:
            data = self.sock.recv(65536)
            assert data, 'the server closed a keep-alive connection'
        except socket.timeout:
            data = b''
        finally:
            self.sock.settimeout(TIMEOUT)
        assert self.buffer + data == b'', f'unexpected bytes: {bytes(self.buffer + data)[:200]!r}'


def round_trip(sock, reader, path, **kw):
    sock.sendall(get(path, **kw))
    return reader.response(kw.get('method', 'GET'))


def assert_reusable(sock, reader, text='again'):
    response = round_trip(sock, reader, f'/say?text={text}')
    assert (response.status, response.body) == (200, text.encode())
    reader.assert_nothing_more()


# -- keep-alive round trips: nothing may wait for the loop's 1 s poll timeout --

@pytest.mark.parametrize('threads', [1, 4])
def test_sequential_round_trips_on_one_connection_do_not_stall(http_server, threads):
    server = http_server(workers=2, threads=threads)
    with connect(server.port) as sock:
        reader = Reader(sock)
        start = time.monotonic()
        for i in range(500):
            response = round_trip(sock, reader, '/')
            assert (response.status, response.body) == (200, httpapp.HELLO), i
            assert 'connection' not in response.headers, response
            assert reader.buffer == b''
        elapsed = time.monotonic() - start
        reader.assert_nothing_more()
    assert elapsed < 5.0, f'500 round trips on one connection took {elapsed:.2f} s'
    assert_healthy(server)


def test_large_responses_on_one_connection_do_not_stall(http_server):
    # Too big for the kernel's buffers: what the pool thread cannot send at
    # once must be sent on at once, not after the loop's 1 s poll timeout.
    # The app takes 50 ms, so that the loop is back in poll() by the time
    # the response is ready (a 1 s stall each: over 6 s in all).
    server = http_server()
    expected = httpapp.big(BEYOND_KERNEL_BUFFERS)
    with connect(server.port) as sock:
        reader = Reader(sock)
        start = time.monotonic()
        for i in range(6):
            response = round_trip(sock, reader, f'/big?n={len(expected)}&ms=50')
            assert response.status == 200 and response.body == expected, i
        elapsed = time.monotonic() - start
        assert_reusable(sock, reader)
    assert elapsed < 3.0, \
        f'6 responses of {len(expected) >> 20} MiB (50 ms each) on one connection took {elapsed:.2f} s'
    assert_healthy(server)


# -- pipelining --

def test_pipelined_requests_are_answered_in_order_and_the_connection_reused(http_server):
    server = http_server()
    payload = os.urandom(20000)
    paths = ['/say?text=0', '/say?text=1&ms=300', *(f'/say?text={i}' for i in range(2, 9))]
    with connect(server.port) as sock:
        reader = Reader(sock)
        start = time.monotonic()
        sock.sendall(b''.join(get(path) for path in paths[:5])
                     + request('/echo', method='POST', body=payload)
                     + b''.join(get(path) for path in paths[5:]))
        for i in range(5):
            assert reader.response().body == str(i).encode()
        echoed = reader.response()
        assert echoed.status == 200 and echoed.body == payload
        for i in range(5, 9):
            assert reader.response().body == str(i).encode()
        elapsed = time.monotonic() - start
        reader.assert_nothing_more()
        assert_reusable(sock, reader)
    assert elapsed < 1.5, f'10 pipelined requests (one of 300 ms) took {elapsed:.2f} s'
    assert_healthy(server)


def test_pipelined_requests_split_at_odd_places(http_server):
    # Requests arrive in pieces that cut headers, and a request arrives
    # while the previous one is still running.
    server = http_server()
    data = b''.join(get(f'/say?text={i}') for i in range(6))
    with connect(server.port) as sock:
        reader = Reader(sock)
        for offset in range(0, len(data), 7):
            sock.sendall(data[offset:offset + 7])
            time.sleep(0.001)  # the scenario: the pieces arrive apart
        for i in range(6):
            assert reader.response().body == str(i).encode()
        sock.sendall(get('/say?text=slow&ms=300'))
        time.sleep(0.1)  # the scenario: the next request arrives 100 ms into the slow one's 300
        sock.sendall(get('/say?text=next'))
        assert reader.response().body == b'slow'
        assert reader.response().body == b'next'
        reader.assert_nothing_more()
        assert_reusable(sock, reader)
    assert_healthy(server)


# -- slow readers --

@pytest.mark.parametrize('size', [2 << 20, BEYOND_KERNEL_BUFFERS], ids=['2MiB', 'beyond-kernel-buffers'])
def test_large_response_to_a_slow_reader(http_server, size):
    server = http_server()
    expected = httpapp.big(size)
    with connect(server.port, rcvbuf=16384) as sock:
        start = time.monotonic()
        sock.sendall(get(f'/big?n={size}&ms=50'))
        time.sleep(0.3)  # the scenario: a slow reader; the server fills the socket and buffers the rest
        reader = Reader(sock)
        while b'\r\n\r\n' not in reader.buffer:
            assert reader._more(4096), 'closed before the headers'
        head, _, body = reader.buffer.partition(b'\r\n\r\n')
        assert head.startswith(b'HTTP/1.1 200 ')
        assert f'Content-Length: {len(expected)}'.encode() in head
        reader.buffer = bytearray()
        while len(body) < len(expected):
            chunk = sock.recv(32768)
            assert chunk, f'closed after {len(body)} of {len(expected)} body bytes'
            body += chunk
            time.sleep(0.001)  # the scenario: a slow reader
        assert body == expected, 'the big body is corrupted'
        elapsed = time.monotonic() - start
        assert elapsed < 10.0, f'{size} bytes to a slow reader took {elapsed:.2f} s'
        assert_reusable(sock, reader)
    assert_healthy(server)


def test_pipelined_large_responses_to_a_slow_reader(http_server):
    # Small responses queued behind large ones still being sent must come
    # after them, whole, in order.
    server = http_server()
    sizes = [BEYOND_KERNEL_BUFFERS, 300_000, 2_000_000]
    with connect(server.port, rcvbuf=16384) as sock:
        sock.sendall(get(f'/big?n={sizes[0]}&ms=50') + get('/say?text=a') + get(f'/big?n={sizes[1]}&ms=50')
                     + get('/say?text=b&ms=50') + get(f'/big?n={sizes[2]}') + get('/say?text=c'))
        time.sleep(0.3)  # the scenario: a slow reader; the server fills the socket and buffers the rest
        reader = Reader(sock)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # read slowly, in small pieces
            chunk = reader._more(32768)
            assert chunk, 'closed in the middle of the responses'
            if reader.buffer.endswith(b'\r\n\r\nc'):
                break
            time.sleep(0.001)  # the scenario: a slow reader
        for size, text in zip(sizes, 'abc'):
            big = reader.response()
            assert big.status == 200 and big.body == httpapp.big(size), size
            assert reader.response().body == text.encode()
        reader.assert_nothing_more()
        assert_reusable(sock, reader)
    assert_healthy(server)


# -- request bodies and headers --

@pytest.mark.parametrize('size', [300_000, 1_100_000])
def test_request_body_is_echoed_intact(http_server, size):
    server = http_server()
    payload = os.urandom(size)
    with connect(server.port) as sock:
        reader = Reader(sock)
        sock.sendall(request('/echo', method='POST', body=payload))
        response = reader.response()
        assert response.status == 200 and response.body == payload, 'the echo differs'
        # Again, the body arriving slowly, in pieces.
        payload = os.urandom(size)
        data = request('/echo', method='POST', body=payload)
        for offset in range(0, len(data), 100_000):
            sock.sendall(data[offset:offset + 100_000])
            time.sleep(0.01)  # the scenario: the body arrives slowly
        response = reader.response()
        assert response.status == 200 and response.body == payload, 'the slow echo differs'
        assert_reusable(sock, reader)
    assert_healthy(server)


def test_large_request_headers(http_server):
    server = http_server()
    headers = [('X-Large', 'L' * 60_000), *((f'X-Many-{i}', f'{i}' * 500) for i in range(100))]
    with connect(server.port) as sock:
        reader = Reader(sock)
        data = get('/headers', headers=headers)
        assert len(data) > 100_000
        for offset in range(0, len(data), 16384):  # in pieces, the way they may arrive
            sock.sendall(data[offset:offset + 16384])
            time.sleep(0.002)  # the scenario: the pieces arrive apart
        response = reader.response()
        assert response.status == 200
        received = json.loads(response.body)
        assert received['HTTP_X_LARGE'] == 'L' * 60_000
        for i in range(100):
            assert received[f'HTTP_X_MANY_{i}'] == f'{i}' * 500
        assert_reusable(sock, reader)
    assert_healthy(server)


# -- the end of a connection --

def test_connection_close_is_answered_then_closed(http_server):
    server = http_server()
    start = time.monotonic()
    for i in range(20):
        with connect(server.port) as sock:
            reader = Reader(sock)
            sock.sendall(get(f'/say?text={i}&ms=20', headers=[('Connection', 'close')]))
            response = reader.response()
            assert (response.status, response.body) == (200, str(i).encode())
            assert response.headers.get('connection', '').lower() == 'close'
            reader.assert_closed()
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f'20 `Connection: close` requests took {elapsed:.2f} s'
    assert_healthy(server)


def test_http_1_0_is_answered_then_closed(http_server):
    server = http_server()
    start = time.monotonic()
    for i in range(20):
        with connect(server.port) as sock:
            reader = Reader(sock)
            sock.sendall(get(f'/say?text={i}&ms=20', version='1.0'))
            response = reader.response()
            assert (response.status, response.body) == (200, str(i).encode())
            reader.assert_closed()
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f'20 HTTP/1.0 requests took {elapsed:.2f} s'
    # HTTP/1.0 asking for keep-alive: the server may keep the connection
    # (and must then answer on it) or close it (and must then say so).
    with connect(server.port) as sock:
        reader = Reader(sock)
        for i in range(3):
            response = round_trip(sock, reader, f'/say?text={i}', version='1.0',
                                  headers=[('Connection', 'keep-alive')])
            assert (response.status, response.body) == (200, str(i).encode())
            if response.headers.get('connection', '').lower() != 'keep-alive':
                assert response.headers.get('connection', '').lower() == 'close', response
                reader.assert_closed()
                break
    assert_healthy(server)


@pytest.mark.parametrize('path', ['/say?text=x', '/say?text=x&ms=100', f'/big?n={BEYOND_KERNEL_BUFFERS}',
                                  f'/big?n={BEYOND_KERNEL_BUFFERS}&ms=100'],
                         ids=['small', 'small-slow-app', 'large', 'large-slow-app'])
def test_a_client_that_half_closes_gets_its_whole_response(http_server, path):
    # `shutdown(SHUT_WR)` after the request (as `nc -N` does): the end of
    # file is seen while the request runs or its response is being sent,
    # and must not cut the response short.
    server = http_server()
    with connect(server.port) as sock:
        sock.sendall(get(path))
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.3)  # the scenario: the client reads late, the end of file reaches the server first
        reader = Reader(sock)
        response = reader.response()
        assert response.status == 200
        assert response.body == (b'x' if path.startswith('/say') else httpapp.big(BEYOND_KERNEL_BUFFERS))
        reader.assert_closed()
    assert_healthy(server)


@pytest.mark.parametrize('goodbye', ['FIN', 'RST', 'both'])
def test_clients_that_disconnect_mid_request(http_server, goodbye):
    """100 clients go away (FIN, or RST with SO_LINGER 0, or both: a third
    with RST) while their request runs, while its response is being sent,
    or before it is complete; the workers survive them all (none is
    replaced) and the server answers on."""
    server = http_server(workers=2, threads=4)
    resets = {'FIN': lambda i: False, 'RST': lambda i: True, 'both': lambda i: i % 3 == 0}[goodbye]
    kinds = ['/sleep?ms=50', '/big', 'partial-headers', 'partial-body']
    for i in range(100):
        sock = connect(server.port)
        kind = kinds[i % len(kinds)]
        if kind == 'partial-headers':
            sock.sendall(get('/')[:10])
        elif kind == 'partial-body':
            sock.sendall(request('/echo', method='POST', body=b'x' * 50_000)[:20_000])
        else:
            sock.sendall(get(kind))
        if resets(i):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        sock.close()
    # The sleeping requests finish, their responses fail, the connections close.
    wait_until(lambda: not worker_connections(server), message='the workers to close every connection')
    with connect(server.port) as sock:
        reader = Reader(sock)
        for i in range(20):
            response = round_trip(sock, reader, f'/say?text={i}')
            assert (response.status, response.body) == (200, str(i).encode())
    for _ in range(10):  # each worker: a new connection may land on either
        assert server.request('/')[0] == 200
    assert_healthy(server)


# -- threads --

def test_threads_run_requests_concurrently(http_server):
    server = http_server(workers=1, threads=4)

    def one(_):
        with connect(server.port) as sock:
            sock.sendall(get('/sleep?ms=200'))
            return Reader(sock).response().status
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))  # warm up: threads and connections
        start = time.monotonic()
        statuses = list(pool.map(one, range(4)))
        elapsed = time.monotonic() - start
    assert statuses == [200] * 4
    assert elapsed < 0.6, f'4 requests of 200 ms on 1 worker x 4 threads took {elapsed:.2f} s'
    assert_healthy(server)


# -- the WSGI side --

def test_iterable_of_several_chunks(http_server):
    server = http_server()
    expected = b''.join(httpapp.CHUNKS)
    with connect(server.port) as sock:
        reader = Reader(sock)
        for _ in range(3):
            response = round_trip(sock, reader, '/chunks')
            assert response.status == 200 and response.body == expected
        assert_reusable(sock, reader)
    # Without a Content-Length, to HTTP/1.0: the body ends with the connection
    # (HTTP/1.1 gets it chunked: tests/test_wsgi.py).
    with connect(server.port) as sock:
        reader = Reader(sock)
        sock.sendall(get('/chunks-nolength', version='1.0'))
        response = reader.response()
        assert response.status == 200 and response.body == expected
        assert response.headers.get('connection', '').lower() == 'close'
        reader.assert_closed()
    assert_healthy(server)


def test_close_of_the_app_iterable_is_called(http_server):
    server = http_server()
    tokens = []

    def token(label):
        tokens.append(f'{label}-{uuid.uuid4().hex[:8]}')
        return tokens[-1]
    with connect(server.port) as sock:
        reader = Reader(sock)
        for _ in range(5):
            name = token('keepalive')
            response = round_trip(sock, reader, f'/closing?id={name}')
            assert response.body == f'closing {name}\n'.encode()
        name = token('large')
        response = round_trip(sock, reader, f'/closing?id={name}&size=3000000')
        assert response.body.startswith(f'closing {name}\n'.encode())
        assert len(response.body) == len(f'closing {name}\n') + 3_000_000
        names = [token('pipelined') for _ in range(3)]
        sock.sendall(b''.join(get(f'/closing?id={name}') for name in names))
        for name in names:
            assert reader.response().body == f'closing {name}\n'.encode()
        name = token('close')
        response = round_trip(sock, reader, f'/closing?id={name}', headers=[('Connection', 'close')])
        assert response.body == f'closing {name}\n'.encode()
        reader.assert_closed()
    assert_closed_once(server, tokens)
    assert_healthy(server)


@pytest.mark.parametrize('goodbye', ['FIN', 'RST'])
def test_close_of_the_app_iterable_is_called_when_the_client_is_gone(http_server, goodbye):
    # The client goes away while the app runs; its large response then
    # cannot be sent.
    server = http_server()
    tokens = [f'gone-{goodbye}-{i}-{uuid.uuid4().hex[:8]}' for i in range(3)]
    for token in tokens:
        with connect(server.port) as sock:
            sock.sendall(get(f'/closing?id={token}&size=3000000&ms=100'))
            if goodbye == 'RST':
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        wait_until(lambda: token in closed_tokens(server), message=f'close() for {token}')
    assert_closed_once(server, tokens)
    assert server.request('/')[0] == 200
    assert_healthy(server)


def closed_tokens(server):
    """The tokens whose close() httpapp has recorded, in order."""
    try:
        with open(server.close_log) as file:
            return file.read().split()
    except FileNotFoundError:
        return []


def assert_closed_once(server, tokens):
    """httpapp's close() was called once for each token (in time)."""
    wait_until(lambda: set(tokens) <= set(closed_tokens(server)), timeout=5, message=f'close() of each of {tokens}')
    time.sleep(0.2)  # the scenario: no second close() may come meanwhile
    assert sorted(closed_tokens(server)) == sorted(tokens), 'close() called more than once'


def test_an_app_that_raises_gets_a_500_and_the_worker_survives(http_server):
    server = http_server(workers=1, threads=2)
    with connect(server.port) as sock:
        reader = Reader(sock)
        sock.sendall(get('/raise'))
        try:
            response = reader.response()
        except (EOFError, ConnectionResetError) as error:
            pytest.fail(f'no response to a request whose app raised: {error}')
        assert response.status == 500, response
    # The 500 is the error handled: the same (one) worker answers on.
    assert server.request('/')[0] == 200
    assert_healthy(server, tracebacks_allowed=True)


def test_an_app_that_raises_in_its_body_ends_the_connection(http_server):
    """Once the response has started, the only way to tell the client is to
    close the connection before Content-Length bytes were sent; the
    connection must not be kept for another request."""
    server = http_server(workers=1, threads=2)
    with connect(server.port) as sock:
        reader = Reader(sock)
        sock.sendall(get('/raise-late'))
        sock.settimeout(3)
        try:
            with pytest.raises(EOFError, match=r'after 7 of 100 body bytes'):
                reader.response()
        except socket.timeout:
            pytest.fail(f'the connection stays open after 7 of 100 body bytes: {reader.buffer[-60:]!r}')
    # The close is the error handled: the same (one) worker answers on.
    assert server.request('/')[0] == 200
    assert_healthy(server, tracebacks_allowed=True)


def test_head_request(http_server):
    server = http_server()
    with connect(server.port) as sock:
        reader = Reader(sock)
        for _ in range(3):
            response = round_trip(sock, reader, '/head', method='HEAD')
            assert response.status == 200
            assert response.headers['content-length'] == str(len(httpapp.HEAD_BODY))
            reader.assert_nothing_more()
        response = round_trip(sock, reader, '/head')
        assert response.body == httpapp.HEAD_BODY
        assert_reusable(sock, reader)
    assert_healthy(server)


def test_head_request_to_an_app_that_returns_a_body_gets_none(http_server):
    # Most apps answer HEAD as GET; the body must not go on the wire (RFC
    # 9110 9.3.2), or the next response on the connection is garbage.
    server = http_server()
    with connect(server.port) as sock:
        reader = Reader(sock)
        response = round_trip(sock, reader, '/', method='HEAD')
        assert response.status == 200
        assert response.headers['content-length'] == str(len(httpapp.HELLO))
        reader.assert_nothing_more()
        assert_reusable(sock, reader)
    assert_healthy(server)


def test_304_has_no_body_and_keeps_the_connection(http_server):
    server = http_server()
    with connect(server.port) as sock:
        reader = Reader(sock)
        sock.sendall(get('/status?code=304') + get('/say?text=after'))
        response = reader.response()
        assert response.status == 304 and response.headers['x-status'] == '304'
        assert 'transfer-encoding' not in response.headers
        following = reader.response()
        assert (following.status, following.body) == (200, b'after')
        response = round_trip(sock, reader, '/status?code=304')
        assert response.status == 304
        assert_reusable(sock, reader)
    assert_healthy(server)


def test_204_has_no_body(http_server):
    server = http_server()
    with connect(server.port) as sock:
        reader = Reader(sock)
        response = round_trip(sock, reader, '/status?code=204')
        assert response.status == 204 and response.headers['x-status'] == '204'
        assert 'content-length' not in response.headers  # RFC 9110 8.6: MUST NOT
        assert 'transfer-encoding' not in response.headers
        if response.headers.get('connection', '').lower() == 'close':
            reader.assert_closed()
        else:
            reader.assert_nothing_more()
            assert_reusable(sock, reader)
    assert_healthy(server)
