"""The findings of a black-box security test of the HTTP layer
(findings F2, F5, F7, F3, F4), each as raw requests sent to real zkprefork
workers (2 x 4 threads) serving tests/echoapp.py: every case asserts what
the client receives AND what the application saw (see test_http_strict)."""
import socket
import time
import uuid
from urllib.parse import quote

import pytest

from support import closed_after
from test_http_strict import (SMALL_LIMITS, SMUGGLED, assert_workers_kept, check, exchange, parse_responses, records,
                              req, start_echo_server)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp('findings'))
    yield server
    assert_workers_kept(server)
    server.stop()


@pytest.fixture(scope='module')
def small_server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp('findings-small'), SMALL_LIMITS)
    yield server
    assert_workers_kept(server)
    server.stop()


# -- F2: trailer fields are dropped, never merged into the header fields (RFC 9110 6.5.1) --

TE_CHUNKED = b'Transfer-Encoding: chunked\r\n'
TRAILERS = {
    'x-forwarded-for': (b'X-Forwarded-For: 10.0.0.1\r\n', b'X-Forwarded-For: 6.6.6.6\r\n',
                        {'HTTP_X_FORWARDED_FOR': '10.0.0.1'}),
    'authorization-added': (b'', b'Authorization: Basic YWRtaW46YWRtaW4=\r\n', {}),
    'cookie-added': (b'', b'Cookie: session=evil\r\n', {}),
    'content-type': (b'Content-Type: text/plain\r\n', b'Content-Type: application/json\r\n',
                     {'CONTENT_TYPE': 'text/plain'}),
    'expect': (b'', b'Expect: 100-continue\r\n', {}),
    'host': (b'', b'Host: evil.example\r\n', {'HTTP_HOST': 'example.com'}),
}


@pytest.mark.parametrize('head,trailer,expected', TRAILERS.values(), ids=TRAILERS.keys())
def test_trailer_fields_are_dropped(server, head, trailer, expected):
    body = b'5\r\nabcde\r\n0\r\n' + trailer + b'\r\n'
    _, saw = check(server, req(head + TE_CHUNKED, body=body), [200], ['/'])
    entry = saw[0]
    assert entry['body'] == 'abcde'
    for key, value in expected.items():
        assert entry[key] == value
    name = trailer.partition(b':')[0].decode().upper().replace('-', '_')
    key = name if name in ('CONTENT_TYPE',) else 'HTTP_' + name
    assert entry.get(key) == expected.get(key)


def test_a_connection_close_trailer_does_not_end_the_connection(server):
    # The application is not told "close"; the next request runs.
    body = b'5\r\nabcde\r\n0\r\nConnection: close\r\n\r\n'
    _, saw = check(server, [req(TE_CHUNKED, body=body, close=False) + SMUGGLED.replace(
        b'\r\n\r\n', b'\r\nConnection: close\r\n\r\n')], [200, 200], ['/', '/smuggled'])
    assert 'HTTP_CONNECTION' not in saw[0]


@pytest.mark.parametrize('trailer', [b'Content-Length: 5\r\n', b'Transfer-Encoding: chunked\r\n'])
def test_framing_trailers_are_still_400(server, trailer):
    # llhttp refuses them: a proxy might apply them.
    body = b'5\r\nabcde\r\n0\r\n' + trailer + b'\r\n'
    check(server, req(TE_CHUNKED, body=body + SMUGGLED, close=False), [400], [])


# -- F5: Host (RFC 9112 3.2, RFC 3986 3.2.2) and absolute-form targets (RFC 9112 3.2.2, RFC 9110 4.2.4) --

def host_request(host, path=b'/{t}', close=False):
    return req(b'Host: ' + host + b'\r\n', path=path, method=b'GET', host=False, close=close)


BAD_HOSTS = {'list': b'a, b', 'space': b'a b', 'slash-userinfo': b'a/b@c', 'port-letters': b'x:abc',
             'userinfo': b'a@b', 'pct-crlf': b'a%0d%0ab', 'pct-nul': b'a%00b', 'bad-ipv6': b'[::g]',
             'unclosed-ipv6': b'[::1', 'two-ports': b'a:1:2', 'quote': b'a"b', 'backslash': b'a\\b',
             'pct-short': b'a%4'}


@pytest.mark.parametrize('host', BAD_HOSTS.values(), ids=BAD_HOSTS.keys())
def test_an_invalid_host_is_400_and_nothing_runs(server, host):
    responses, _ = check(server, host_request(host) + SMUGGLED, [400], [])
    assert responses[0][1]['connection'] == 'close'


GOOD_HOSTS = [b'example.com', b'example.com:8080', b'127.0.0.1:80', b'[::1]:8080', b'[v1.x]', b'a%41b',
              b'x:', b'a,b', b'xn--bcher-kva.example']


@pytest.mark.parametrize('host', GOOD_HOSTS)
def test_a_valid_host_reaches_the_application(server, host):
    _, saw = check(server, host_request(host, close=True), [200], ['/'])
    assert saw[0]['HTTP_HOST'] == host.decode()


@pytest.mark.parametrize('target,host', [
    (b'http://evil.example/{t}', 'evil.example'),
    (b'HTTPS://evil.example:8443/{t}?x=1', 'evil.example:8443'),
    (b'http://[::1]:80/{t}', '[::1]:80'),
])
def test_an_absolute_form_target_sets_the_host(server, target, host):
    _, saw = check(server, host_request(b'example.com', path=target, close=True), [200], ['/'])
    assert saw[0]['HTTP_HOST'] == host


def test_an_absolute_form_target_with_a_query_and_no_path(server):
    _, saw = check(server, host_request(b'example.com', path=b'http://evil?{t}=1', close=True), [200], ['/'])
    assert saw[0]['HTTP_HOST'] == 'evil' and saw[0]['PATH_INFO'] == '/'


BAD_TARGETS = {'userinfo': b'http://u:p@evil.example/{t}', 'user': b'http://u@evil.example/{t}',
               'ftp': b'ftp://evil.example/{t}', 'file': b'file://evil.example/{t}',
               'no-host': b'http:///{t}', 'bad-port': b'http://evil:x/{t}'}


@pytest.mark.parametrize('target', BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
def test_an_unusable_absolute_form_target_is_400(server, target):
    check(server, host_request(b'example.com', path=target) + SMUGGLED, [400], [])


# -- F7 a: limit_request_line bounds the whole request line (100 bytes on small_server) --

@pytest.mark.parametrize('extra', [1, 5, 13])
def test_a_complete_request_line_over_limit_request_line_is_414(small_server, extra):
    # GET /{t}... HTTP/1.1: the target alone is within the limit, the line is not
    target_size = 100 - len(b'GET  HTTP/1.1') + extra
    path = b'/{t}' + b'a' * (target_size - 4 - 12 + 3)
    check(small_server, req(b'', path=path, method=b'GET'), [414], [])


# -- F7 b: HTTP/1.x with x > 1 is served as HTTP/1.1 (RFC 9110 2.5) --

@pytest.mark.parametrize('version', [b'HTTP/1.2', b'HTTP/1.9'])
def test_a_higher_minor_version_is_served_as_1_1(server, version):
    responses, saw = check(server, req(b'', method=b'GET', version=version), [200], ['/'])
    assert saw[0]['SERVER_PROTOCOL'] == 'HTTP/1.1'


def test_a_higher_minor_version_keeps_the_connection(server):
    first = req(b'', method=b'GET', version=b'HTTP/1.2', close=False)
    check(server, first + req(b'', path=b'/{t}2', method=b'GET'), [200, 200], ['/', '/2'])


@pytest.mark.parametrize('version', [b'HTTP/2.0', b'HTTP/3.1', b'HTTP/0.9'])
def test_another_major_version_is_505(server, version):
    check(server, req(b'', method=b'GET', version=version, close=False) + SMUGGLED, [505], [])


# -- F7 c: chunk extensions (RFC 9112 7.1.1) --

@pytest.mark.parametrize('size_line', [b'5;a=b', b'5;a="x y"', b'5;a;b=c'])
def test_a_valid_chunk_extension_is_accepted(server, size_line):
    body = size_line + b'\r\nabcde\r\n0\r\n\r\n'
    _, saw = check(server, req(TE_CHUNKED, body=body), [200], ['/'])
    assert saw[0]['body'] == 'abcde'


@pytest.mark.parametrize('size_line', [b'5 ;a=b', b'5; a=b', b'5\t;a=b'])
def test_bws_before_a_chunk_extension_is_refused_by_llhttp(server, size_line):
    # RFC 9112 allows it; llhttp does not (its leniency would also let "5 " through): 400, documented.
    body = size_line + b'\r\nabcde\r\n0\r\n\r\n'
    check(server, req(TE_CHUNKED, body=body + SMUGGLED, close=False), [400], [])


@pytest.mark.parametrize('extension_size', [700, 100_000])
def test_chunk_extensions_beyond_the_header_size_limit_are_431(small_server, extension_size):
    # limit_request_header_size = 600 on small_server
    body = b'5;a=' + b'x' * extension_size + b'\r\nabcde\r\n0\r\n\r\n'
    check(small_server, req(TE_CHUNKED, body=body + SMUGGLED, close=False), [431], [])


def test_chunk_extensions_are_counted_over_all_chunks(small_server):
    chunk = b'1;a=' + b'x' * 100 + b'\r\nz\r\n'
    body = chunk * 12 + b'0\r\n\r\n'
    check(small_server, req(TE_CHUNKED, body=body + SMUGGLED, close=False), [431], [])


def test_many_small_chunks_are_no_extensions(small_server):
    body = b'1\r\nz\r\n' * 900 + b'0\r\n\r\n'  # 900 bytes of data, 5400 of framing
    _, saw = check(small_server, req(TE_CHUNKED, body=body), [200], ['/'])
    assert saw[0]['body'] == 'z' * 900


# -- F7 d: an unknown method is 501 (RFC 9110 9.1), an invalid one 400 --

@pytest.mark.parametrize('method', [b'FOO', b'BREW', b'X-METHOD'])
def test_an_unknown_method_is_501(server, method):
    check(server, req(b'', method=method, close=False) + SMUGGLED, [501], [])


@pytest.mark.parametrize('method', [b'G(T', b'GE"T'])
def test_a_method_that_is_no_token_is_400(server, method):
    check(server, req(b'', method=method, close=False) + SMUGGLED, [400], [])


# -- F7 e: the request target holds RFC 3986 characters only --

@pytest.mark.parametrize('char', list(b'"<>\\^`{|}'), ids=list('"<>\\^`{|}'))
def test_a_character_outside_rfc_3986_in_the_target_is_400(server, char):
    check(server, req(b'', path=b'/{t}a' + bytes([char]) + b'b', method=b'GET', close=False) + SMUGGLED,
          [400], [])


def test_every_rfc_3986_character_is_accepted_in_the_target(server):
    path = b"/{t}-._~:@!$&'()*+,;=%41/[x]?q=/?:@"
    _, saw = check(server, req(b'', path=path, method=b'GET'), [200], ["/-._~:@!$&'()*+,;=A/[x]"])
    assert saw[0]['QUERY_STRING'] == 'q=/?:@'


# -- F3: a body the application reads after 100 Continue must keep arriving (request_body_min_rate) --

def expect_head(path, framing):
    return (b'POST ' + path + b' HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n' + framing + b'\r\n')


def probe_latency(server, token):
    start = time.monotonic()
    data = exchange(server, req(b'', path=b'/' + token.encode() + b'probe', method=b'GET'), read_timeout=10)
    assert parse_responses(data)[0][0] == 200
    return time.monotonic() - start


@pytest.mark.timeout(60)
@pytest.mark.parametrize('framing', [b'Content-Length: 900\r\n', b'Transfer-Encoding: chunked\r\n'],
                         ids=['content-length', 'chunked'])
def test_slow_bodies_after_100_continue_do_not_hold_the_threads(small_server, framing):
    # small_server: request_read_timeout = 1, request_body_min_rate = 500 (the default):
    # a body trickling at 1 byte/s is late after ~1 s; 16 such bodies used all 8 threads forever.
    token = uuid.uuid4().hex[:12]
    trickle = b'1\r\nx\r\n' if framing.startswith(b'Transfer') else b'x'
    socks = []
    try:
        for _ in range(16):
            sock = socket.create_connection(('127.0.0.1', small_server.port), timeout=10)
            sock.sendall(expect_head(b'/' + token.encode() + b'slow', framing))
            socks.append(sock)
        latencies = []
        answers = {sock: bytearray() for sock in socks}
        ended = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            for sock in socks:
                if sock not in ended:
                    ended.update(trickle_one(sock, trickle, answers[sock]))
            latencies.append(probe_latency(small_server, token))
            time.sleep(0.2)
    finally:
        for sock in socks:
            sock.close()
    assert max(latencies) < 2, latencies
    statuses = {response_statuses(bytes(data)) for data in answers.values()}
    # 100 Continue for those the application read, then 408; a reset may lose it
    assert statuses <= {(100, 408), (408,), ()}, statuses
    assert (100, 408) in statuses
    assert [entry['PATH_INFO'] for entry in records(small_server, token)] == ['/' + token + 'probe'] * len(latencies)
    assert 'RequestBodyTimeout' not in small_server.log()  # answered, not logged as the application's error


def trickle_one(sock, trickle, received):
    """Read what the server sent (into `received`), then send `trickle`;
    [sock] once the server closed the connection."""
    sock.setblocking(False)
    try:
        while chunk := sock.recv(65536):
            received += chunk
        return [sock]
    except BlockingIOError:
        pass
    except OSError:
        return [sock]
    try:
        sock.send(trickle)
    except OSError:
        return [sock]
    return []


def response_statuses(data):
    statuses = []
    while data.startswith(b'HTTP/1.1 100'):
        statuses.append(100)
        data = data.partition(b'\r\n\r\n')[2]
    if data:
        statuses += [status for status, _, _ in parse_responses(data)]
    return tuple(statuses)


# -- F4: idle connections are closed after keepalive seconds --

@pytest.fixture(scope='module')
def keepalive_server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp('keepalive'), 'keepalive = 1\n')
    yield server
    assert_workers_kept(server)
    server.stop()


def test_a_connection_that_sends_nothing_is_closed(keepalive_server):
    with socket.create_connection(('127.0.0.1', keepalive_server.port)) as sock:
        assert 0.9 < closed_after(sock) < 3  # keepalive = 1, checked every second


def test_an_idle_keep_alive_connection_is_closed(keepalive_server):
    token = uuid.uuid4().hex[:12]
    with socket.create_connection(('127.0.0.1', keepalive_server.port)) as sock:
        sock.sendall(req(b'', path=b'/' + token.encode(), method=b'GET', close=False))
        head = b''
        while b'}' not in head:
            head += sock.recv(65536)
        assert head.startswith(b'HTTP/1.1 200 ')
        assert 0.9 < closed_after(sock) < 3
    assert len(records(keepalive_server, token)) == 1


def test_a_connection_in_use_is_not_idle(keepalive_server):
    # a request running 2.5 s, then a second request on the same connection 0.5 s later
    token = uuid.uuid4().hex[:12]
    with socket.create_connection(('127.0.0.1', keepalive_server.port), timeout=10) as sock:
        sock.sendall(req(b'', path=b'/slow?ms=2500&' + token.encode(), method=b'GET', close=False))
        received = b''
        while received.count(b'HTTP/1.1 200 ') < 1 or not received.endswith(b'}'):
            received += sock.recv(65536)
        time.sleep(0.5)
        sock.sendall(req(b'', path=b'/' + token.encode(), method=b'GET'))
        while chunk := sock.recv(65536):
            received += chunk
    assert [status for status, _, _ in parse_responses(received)] == [200, 200]


def test_a_slowly_arriving_head_is_governed_by_request_read_timeout(keepalive_server):
    # a byte every 0.5 s for 3 s: more than keepalive, less than request_read_timeout (30 s)
    token = uuid.uuid4().hex[:12]
    raw = req(b'', path=b'/' + token.encode(), method=b'GET')
    with socket.create_connection(('127.0.0.1', keepalive_server.port), timeout=10) as sock:
        for piece in (raw[:4], raw[4:8], raw[8:12], raw[12:16], raw[16:20], raw[20:]):
            sock.sendall(piece)
            time.sleep(0.5)
        received = b''
        while chunk := sock.recv(65536):
            received += chunk
    assert [status for status, _, _ in parse_responses(received)] == [200]
    assert len(records(keepalive_server, token)) == 1


# -- the application's response framing and fields (RFC 9110 5.5, 5.6.2, 6.4.1,
# -- 8.6; PEP 3333 on hop-by-hop fields): refused before a byte is sent --

def respond(status, name, value, body='ok'):
    token = uuid.uuid4().hex[:12]
    query = '&'.join(f'{key}={quote(text, safe="")}' for key, text in
                     (('status', status), ('name', name), ('value', value), ('body', body)))
    return token, f'GET /respond?{query}&{token} HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'


@pytest.mark.parametrize('status, name, value', [
    ('200 OK', 'Set-Cookie: evil=1; x', 'v'),   # a name that would inject a field
    ('200 OK', 'X A', 'v'),
    ('200 OK', '', 'v'),
    ('200 OK', 'X-\u00e9', 'v'),
    ('200 OK', 'X-Echo', 'a\x0bb'),
    ('200 OK', 'X-Echo', 'a\x1bb'),
    ('200 OK', 'X-Echo', 'a\x7fb'),
    ('200 OK', 'Content-Length', 'abc'),
    ('200 OK', 'Content-Length', '-1'),
    ('200 OK', 'Transfer-Encoding', 'chunked'),
    ('200 OK', 'Upgrade', 'h2c'),
    ('100 Continue', 'X-Echo', 'v'),
    ('103 Early Hints', 'Link', '</a>'),
])
def test_a_response_field_or_status_the_application_may_not_send_is_a_500(server, status, name, value):
    token, raw = respond(status, name, value)
    data = exchange(server, raw.encode('latin-1'))
    statuses = [status for status, _, _ in parse_responses(data)]
    assert statuses == [500, 200], data  # and the next request is framed as it should be
    assert b'evil' not in data and b'\x0b' not in data and b'h2c' not in data
    assert [entry['PATH_INFO'] for entry in records(server, token)] == ['/respond']


def test_content_length_fields_that_disagree_are_a_500(server):
    token = uuid.uuid4().hex[:12]
    raw = (f'GET /respond?status=200%20OK&name=Content-Length&value=2&name2=Content-Length&value2=5'
           f'&body=ok&{token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    assert [status for status, _, _ in parse_responses(exchange(server, raw.encode()))] == [500]


@pytest.mark.parametrize('status', ['204 No Content', '304 Not Modified'])
def test_no_body_follows_a_204_or_304_whatever_the_application_returns(server, status):
    injected = 'HTTP/1.1 200 OK\r\nSet-Cookie: pwned=1\r\nContent-Length: 0\r\n\r\n'
    token, raw = respond(status, 'X-Echo', 'v', body=injected)
    data = exchange(server, raw.encode())
    assert [status for status, _, _ in parse_responses(data)] == [int(status[:3]), 200], data
    assert b'pwned' not in data
