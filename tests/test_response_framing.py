"""Response framing and request-line reading that real proxies disagreed
with (issue 18, item 8; RFC 9110 8.6 and 15, RFC 9112 2.2 and 4), each
case sent as raw bytes to real zkprefork workers (2 x 4 threads) serving
tests/echoapp.py, whose log shows which requests reached the application:

- no Content-Length (and no body) on a 204; an application's
  Content-Length on a 304 is kept (RFC 9110 8.6), its body never sent;
- a status is three ASCII digits from 200 to 599, else a 500;
- only CRLF may come before a request line (RFC 9112 2.2): a bare CR or
  LF there is 400, also between keep-alive requests;
- the answer to an unknown method (or a request line) depends on the
  bytes, never on how they were split;
- the application's equal Content-Length fields, and its Connection, go
  out once.
"""
import select
import socket
import time
import uuid
from urllib.parse import quote

import pytest

from support import wait_until
from test_http_strict import records, start_echo_server

pytestmark = pytest.mark.timeout(120)

LINE_LIMIT = 200  # limit_request_line: long lines stay quick to send a byte at a time
READ_TIMEOUT = 5  # s: every exchange ends with the server closing the connection
PAUSE = 0.004     # s between pieces, so that the worker reads each one on its own


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp('framing'), f'limit_request_line = {LINE_LIMIT}\n')
    yield server
    server.stop()


def exchange(server, pieces, pause=PAUSE):
    """Send `pieces` (each written on its own, `pause` s apart), read until
    the server closes; the bytes received."""
    received = bytearray()
    with socket.create_connection(('127.0.0.1', server.port), timeout=READ_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(pause)
                # Read as it comes: a server that refused the request and
                # closed resets the connection when more bytes arrive,
                # and the kernel may then drop what it had received.
                if not drain(sock, received):
                    break
            while chunk := sock.recv(65536):
                received += chunk
        except socket.timeout:
            pytest.fail(f'the server kept the connection open; received {bytes(received)[:300]!r}')
        except (BrokenPipeError, ConnectionResetError):
            pass  # after the server's last response: what came counts
    return bytes(received)


def drain(sock, received):
    """Add what has arrived to `received`; False once the server closed."""
    while select.select([sock], [], [], 0)[0]:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        received += chunk
    return True


def responses(data, no_body=()):
    """[(status line, [(name, value)], body)]: a body is as long as its
    Content-Length, except for the responses numbered in `no_body` (to
    HEAD, or 204/304, whose Content-Length frames nothing)."""
    found = []
    while data:
        head, separator, data = data.partition(b'\r\n\r\n')
        assert separator, f'a truncated response head: {head[:300]!r}'
        status, *lines = head.split(b'\r\n')
        fields = [tuple(part.strip() for part in line.decode('latin-1').split(':', 1)) for line in lines]
        lengths = [int(value) for name, value in fields if name.lower() == 'content-length']
        size = 0 if len(found) in no_body or not lengths else lengths[0]
        found.append((status, fields, data[:size]))
        data = data[size:]
    return found


def values(fields, name):
    return [value for key, value in fields if key.lower() == name]


def respond(status, fields=(), body='', close=False, method='GET', token=''):
    """A request that echoapp answers with `status`, `fields` and `body`."""
    args = [('status', status)]
    for number, (name, value) in enumerate(fields):
        suffix = str(number + 1) if number else ''
        args += [('name' + suffix, name), ('value' + suffix, value)]
    args.append(('body', body))
    query = '&'.join(f'{key}={quote(text, safe="")}' for key, text in args)
    connection = 'Connection: close\r\n' if close else ''
    return f'{method} /respond?{query}&{token} HTTP/1.1\r\nHost: x\r\n{connection}\r\n'.encode('latin-1')


def seen(server, token):
    time.sleep(0.05)  # a request run in spite of all is logged by now
    return [entry['PATH_INFO'] for entry in records(server, token)]


def warnings_about(server, text):
    return [line for line in server.log().splitlines() if 'WARNING' in line and text in line]


# -- RFC 9110 8.6, 6.4.1: a 204 is framed by its status alone --

def test_a_204_is_sent_without_content_length_and_a_304_keeps_the_applications(server):
    # Varnish answers 503 to a 204 with Content-Length. The 204 goes out
    # without it (the framing never depended on it); "0" is what frameworks
    # send and is dropped silently, any other length or a body is logged once.
    token = uuid.uuid4().hex[:12]
    pipelined = (respond('204 No Content', [('Content-Length', '5')], 'hello', token=f'{token}-a')
                 + respond('204 No Content', [('Content-Length', '0')], token=f'{token}-b')
                 + respond('304 Not Modified', [('Content-Length', '123'), ('ETag', '"x"')], 'hello',
                           token=f'{token}-c')
                 + f'GET /after?{token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'.encode())
    found = responses(exchange(server, [pipelined]), no_body=(0, 1, 2))
    assert [status for status, _, _ in found] == [b'HTTP/1.1 204 No Content', b'HTTP/1.1 204 No Content',
                                                  b'HTTP/1.1 304 Not Modified', b'HTTP/1.1 200 OK'], found
    (_, no_content, body_a), (_, empty, body_b), (_, not_modified, body_c), (_, _, after) = found
    assert values(no_content, 'content-length') == [] and values(empty, 'content-length') == []
    assert values(not_modified, 'content-length') == ['123']  # the representation's (RFC 9110 8.6)
    assert body_a == body_b == body_c == b''
    assert b'"PATH_INFO": "/after"' in after  # framed where the 304 ended: nothing of "hello" came
    assert seen(server, token) == ['/respond'] * 3 + ['/after']
    wait_until(lambda: len(warnings_about(server, f'{token}-c')) == 1, timeout=5, message='the 304 body logged')
    assert len(warnings_about(server, f'{token}-a')) == 1  # its length and its body: one line
    assert warnings_about(server, f'{token}-b') == []


# -- RFC 9110 15: a status code is three digits, 1xx to 5xx --

@pytest.mark.parametrize('status', ['\xb2\xb2\xb2 Odd', '600 Beyond', '999 Far Beyond'],
                         ids=['superscript-digits', '600', '999'])
def test_a_status_other_than_ascii_200_to_599_is_a_500(server, status):
    # str.isdigit() is true for '²' (latin-1, so it could be sent); HAProxy
    # answers 502 to it. 599 still goes out, in the same exchange.
    token = uuid.uuid4().hex[:12]
    raw = respond(status, [('Content-Length', '2')], 'ok', token=token) + respond(
        '599 Last', [('Content-Length', '4')], 'last', close=True, token=token)
    found = responses(exchange(server, [raw]))
    assert [line for line, _, _ in found] == [b'HTTP/1.1 500 Internal Server Error', b'HTTP/1.1 599 Last'], found
    assert found[1][2] == b'last'
    assert seen(server, token) == ['/respond', '/respond']
    wait_until(lambda: 'not an HTTP status a WSGI application may send' in server.log(), timeout=5,
               message="the application's error in the log")


# -- RFC 9112 2.2: only empty lines (CRLF) may precede a request line --

def request(path, close=True):
    connection = b'Connection: close\r\n' if close else b''
    return b'GET ' + path.encode() + b' HTTP/1.1\r\nHost: x\r\n' + connection + b'\r\n'


@pytest.mark.parametrize('where', ['first', 'between-keep-alive-requests'])
@pytest.mark.parametrize('junk', [b'\r', b'\n', b'\r\r\n', b'\r\n\r', b'\n\r\n', b'\r\n\n'],
                         ids=['cr', 'lf', 'cr-crlf', 'crlf-cr', 'lf-crlf', 'crlf-lf'])
def test_a_bare_cr_or_lf_before_a_request_line_is_400(server, junk, where):
    token = uuid.uuid4().hex[:12]
    first = request(f'/first?{token}', close=False) if where != 'first' else b''
    raw = first + junk + request(f'/{token}')
    for pieces in ([raw], [raw[i:i + 1] for i in range(len(raw))]):  # whole, then a byte at a time
        found = responses(exchange(server, pieces))
        assert [line[:12] for line, _, _ in found] == [b'HTTP/1.1 200'] * bool(first) + [b'HTTP/1.1 400'], found
    assert seen(server, token) == ['/first'] * 2 * bool(first)
    # Empty lines are still ignored, where they may be.
    control = first + b'\r\n\r\n' + request(f'/{token}')
    assert [line[:12] for line, _, _ in responses(exchange(server, [control]))] == [b'HTTP/1.1 200'] * (1 + bool(first))


# -- the answer depends on the bytes, never on their segmentation --

def splits(raw, method):
    """The same bytes whole, a byte at a time, and in two pieces at every
    boundary in and just after the method."""
    yield 'whole', [raw]
    yield 'bytes', [raw[i:i + 1] for i in range(len(raw))]
    for cut in range(1, len(method) + 2):
        yield f'cut-{cut}', [raw[:cut], raw[cut:]]


LONG = 'a' * LINE_LIMIT


@pytest.mark.parametrize('method, path, status', [
    ('FOO', '/', 501), ('get', '/', 501), ('GETX', '/', 501),
    # Known at its SP, before the line passes limit_request_line (it was
    # 414 whole and 400 a byte at a time).
    ('FOO', '/' + LONG, 501),
], ids=['FOO', 'get', 'GETX', 'FOO-long-line'])
def test_an_unknown_method_gets_one_answer_however_the_bytes_are_split(server, method, path, status):
    token = uuid.uuid4().hex[:12]
    raw = f'{method} {path}?{token} HTTP/1.1\r\nHost: x\r\n\r\n'.encode()
    answers = {name: [line[:12] for line, _, _ in responses(exchange(server, pieces))]
               for name, pieces in splits(raw, method)}
    assert answers == {name: [b'HTTP/1.1 %d' % status] for name in answers}
    assert seen(server, token) == []


def test_a_request_line_of_limit_request_line_bytes_is_served_however_split(server):
    # Its CR arriving alone, last, made it one byte longer than the limit: 414.
    token = uuid.uuid4().hex[:12]
    target = f'/{token}?'
    line = f'GET {target}{"a" * (LINE_LIMIT - len(f"GET {target} HTTP/1.1"))} HTTP/1.1'
    assert len(line) == LINE_LIMIT
    raw = f'{line}\r\nHost: x\r\nConnection: close\r\n\r\n'.encode()
    cuts = [[raw], [raw[i:i + 1] for i in range(len(raw))]] + [
        [raw[:cut], raw[cut:]] for cut in (LINE_LIMIT - 1, LINE_LIMIT, LINE_LIMIT + 1, LINE_LIMIT + 2)]
    for pieces in cuts:
        found = responses(exchange(server, pieces))
        assert [status[:12] for status, _, _ in found] == [b'HTTP/1.1 200'], (len(pieces), found)
    assert seen(server, token) == [f'/{token}'] * len(cuts)


# -- the application's framing fields go out once --

@pytest.mark.parametrize('fields, name, sent, keeps', [
    ([('Content-Length', '2'), ('Content-Length', '2')], 'content-length', ['2'], True),
    ([('Content-Length', '2'), ('content-length', '02')], 'content-length', ['2'], True),
    ([('Connection', 'close'), ('Content-Length', '2')], 'connection', ['close'], False),
    ([('Connection', 'Close, X-Other'), ('Content-Length', '2')], 'connection', ['close'], False),
], ids=['equal-content-lengths', 'equal-content-lengths-spelt-apart', 'connection-close', 'connection-list'])
def test_the_applications_framing_fields_are_sent_once(server, fields, name, sent, keeps):
    token = uuid.uuid4().hex[:12]
    raw = respond('200 OK', fields, 'ok', token=token) + request(f'/after?{token}')
    found = responses(exchange(server, [raw]))
    assert [line for line, _, _ in found] == [b'HTTP/1.1 200 OK'] * (2 if keeps else 1), found
    assert values(found[0][1], name) == sent and found[0][2] == b'ok'
    assert len(values(found[0][1], 'connection')) == (0 if keeps else 1)
    assert seen(server, token) == ['/respond'] + ['/after'] * keeps
