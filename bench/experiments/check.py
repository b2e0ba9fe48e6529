"""Does zkprefork's worker still speak HTTP correctly?  Run after a change to
zkprefork/zopeserver.py, before trusting the bench's numbers:

    python3 bench/experiments/check.py

Starts zkprefork (on 127.0.0.1, stopped by pid at the end) and checks:
single-connection round trips (nothing waits for a poll timeout), pipelined
requests, a large response to a slow reader followed by keep-alive reuse,
request bodies, `Connection: close` and HTTP/1.0, clients that disconnect
while their request runs, that threads run requests concurrently (1 worker x
4 threads: 4 requests of 200 ms finish together), and that the log holds no
traceback.
"""
import concurrent.futures
import os
import socket
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]  # bench's modules, this checkout's zkprefork

import apps  # noqa: E402
from servers import Server  # noqa: E402
from zkprefork.testing import Processes  # noqa: E402


def read_response(sock, buffer=b''):
    """(status, headers, body, rest of buffer) of one response with Content-Length."""
    while b'\r\n\r\n' not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f'connection closed before the headers ({buffer[:80]!r})')
        buffer += chunk
    head, _, buffer = buffer.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(':') for line in lines[1:])}
    length = int(headers.get('content-length', 0))
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError('connection closed in the body')
        buffer += chunk
    return status, headers, buffer[:length], buffer[length:]


def connect(port):
    sock = socket.create_connection(('127.0.0.1', port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def get(path):
    return f'GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'.encode()


def check_round_trips(port):
    with connect(port) as sock:
        start = time.monotonic()
        for _ in range(2000):
            sock.sendall(get('/'))
            status, _, body, rest = read_response(sock)
            assert status == 200 and body == apps.HELLO and not rest
        elapsed = time.monotonic() - start
    assert elapsed < 3.0, f'2000 round trips on one connection took {elapsed:.2f} s'
    return f'2000 sequential requests on one connection in {elapsed * 1000:.0f} ms'


def check_pipelining(port):
    with connect(port) as sock:
        sock.sendall(get('/') + get('/sleep10') + get('/') * 8)
        rest = b''
        for _ in range(10):
            status, _, body, rest = read_response(sock, rest)
            assert status == 200 and body == apps.HELLO
        sock.sendall(get('/'))
        status, _, body, rest = read_response(sock, rest)
        assert status == 200 and not rest
    return '10 pipelined requests answered in order, connection reused after'


def check_big_slow_reader(port):
    with connect(port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(get('/big'))
        time.sleep(0.3)  # let the server fill the socket and buffer the rest
        buffer = b''
        while b'\r\n\r\n' not in buffer:
            buffer += sock.recv(4096)
        head, _, body = buffer.partition(b'\r\n\r\n')
        while len(body) < len(apps.BIG):
            chunk = sock.recv(32768)
            assert chunk, 'closed in the middle of the big body'
            body += chunk
            time.sleep(0.001)
        assert body == apps.BIG, 'big body corrupted'
        sock.sendall(get('/'))
        status, _, body, _ = read_response(sock)
        assert status == 200 and body == apps.HELLO
    return f'{len(apps.BIG)} bytes to a slow reader intact, connection reused after'


def check_body(port):
    payload = os.urandom(300_000)
    with connect(port) as sock:
        sock.sendall(b'POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n' % len(payload)
                     + payload)
        status, _, body, _ = read_response(sock)
        assert status == 200 and body == payload, 'echo differs'
    return '300 kB request body echoed intact'


def check_close(port):
    with connect(port) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n')
        status, headers, body, _ = read_response(sock)
        assert status == 200 and headers.get('connection', '').lower() == 'close'
        assert sock.recv(10) == b'', 'not closed after Connection: close'
    with connect(port) as sock:
        sock.sendall(b'GET / HTTP/1.0\r\n\r\n')
        status, _, body, _ = read_response(sock)
        assert status == 200 and sock.recv(10) == b'', 'HTTP/1.0 not closed'
    return '`Connection: close` and HTTP/1.0 answered, then closed'


def check_disconnects(port):
    for i in range(100):
        sock = connect(port)
        sock.sendall(get('/sleep10' if i % 2 else '/big'))
        if i % 3 == 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')  # RST
        sock.close()
    time.sleep(0.3)
    with connect(port) as sock:
        for _ in range(20):
            sock.sendall(get('/'))
            status, _, body, _ = read_response(sock)
            assert status == 200
    return '100 clients gone mid-request (FIN or RST), server still answers'


def check_concurrency(port):
    def one(_):
        with connect(port) as sock:
            sock.sendall(get('/sleep?ms=200'))
            return read_response(sock)[0]
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, range(4)))
    elapsed = time.monotonic() - start
    assert statuses == [200] * 4
    assert elapsed < 0.35, f'4 requests of 200 ms on 4 threads took {elapsed * 1000:.0f} ms'
    return f'4 requests of 200 ms on 1 worker x 4 threads done in {elapsed * 1000:.0f} ms'


def main():
    kind = 'zkprefork'
    workdir = tempfile.mkdtemp(prefix='zkprefork-check-')
    processes = Processes()
    failures = 0
    try:
        for workers, checks in ((2, (check_round_trips, check_pipelining, check_big_slow_reader, check_body,
                                     check_close, check_disconnects)),
                                (1, (check_concurrency,))):
            server = Server(kind, processes, workdir, workers=workers, threads=4).start().wait_ready()
            for check in checks:
                try:
                    print(f'ok    {check.__name__}: {check(server.port)}')
                except Exception as error:
                    failures += 1
                    print(f'FAIL  {check.__name__}: {error!r}')
            server.stop()
            text = server.proc.log()
            if 'Traceback' in text or 'Error' in text:
                failures += 1
                print(f'FAIL  {kind} ({workers} workers) logged errors:\n{text[-3000:]}')
            else:
                print(f'ok    no traceback in the log ({workers} worker(s))')
    finally:
        processes.stop_all()
    print(f'{kind}: {"all checks passed" if not failures else f"{failures} FAILED"}')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
