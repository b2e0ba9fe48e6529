"""HTTP/1.1 that a proxy can trust: raw requests a front proxy could read
one way and a lenient server another (request smuggling), malformed
requests, limits, pipelining after a connection-ending request, response
splitting, 100-continue and the WSGI environ, each sent over a raw socket
to real zkprefork workers (2 workers x 4 threads) serving tests/echoapp.py.

Every case asserts what the client receives AND what the application saw:
echoapp appends a JSON line per call to a log before it answers, and every
request a case sends carries the case's token in its path, so a smuggled
request that runs but whose response is lost still shows.

Sources of the cases: RFC 9112 (sections 2.2, 3, 5, 6, 7, 9.6) and RFC 9110
(5.5, 8.6, 10.1.1), and the advisories behind waitress's and gunicorn's
fixes: CVE-2019-16785 (bare LF as line end), CVE-2019-16786 (Transfer-Encoding
other than chunked), CVE-2019-16789 (invalid whitespace in header values),
CVE-2019-16792 (two Content-Length headers), CVE-2020-5236 (quadratic regex
on a header value), CVE-2022-24761 (chunk sizes and Content-Length with +,
0x, _ or spaces), CVE-2022-31015 (a request pipelined behind a closing one),
CVE-2024-1135 (Transfer-Encoding validation in gunicorn), CVE-2024-6827
(TE.CL in gunicorn), CVE-2024-49768 (requests processed after the
connection was to close).
"""
import json
import os
import socket
import time
import uuid

import psutil
import pytest

from support import Server, wait_until, write_ini

pytestmark = pytest.mark.timeout(120)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
READ_TIMEOUT = 5  # seconds: every case ends with the server closing the connection


# -- servers: one with the default limits, one with small ones --

def start_app_server(directory, app, options=''):
    """zkprefork (2 workers x 4 threads) serving tests/APP.py, whose log
    ($APP_LOG, e.g. ECHOAPP_LOG) is the server's .app_log."""
    log = os.path.join(directory, f'{app}.log')
    config = write_ini(str(directory), f'host = 127.0.0.1\nworkers = 2\nthreads = 4\n{options}',
                       app=f'call:{app}:factory')
    pythonpath = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get('PYTHONPATH')]))
    env = {'PYTHONPATH': pythonpath, f'{app.upper()}_LOG': log}
    server = Server([config], str(directory), env=env).start()
    try:
        server.wait_serving()
        server.app_log = log
        server.workers_at_start = wait_until(
            lambda: (pids := server.worker_pids()) and len(pids) == 2 and pids, message='2 workers')
    except BaseException:
        server.stop()
        raise
    return server


def start_echo_server(directory, options=''):
    return start_app_server(directory, 'echoapp', options)


@pytest.fixture(scope='module')
def strict_server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp('strict'))
    yield server
    server.stop()


SMALL_LIMITS = '''\
limit_request_line = 100
limit_request_fields = 5
limit_request_field_size = 200
limit_request_header_size = 600
max_request_body_size = 1000
request_read_timeout = 1
'''


@pytest.fixture(scope='module')
def small_server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp('small'), SMALL_LIMITS)
    yield server
    server.stop()


def assert_workers_kept(server):
    assert server.process.poll() is None, server.log()
    assert server.worker_pids() == server.workers_at_start, f'a worker was replaced:\n{server.log()}'
    log = server.log()
    assert 'crashed' not in log and 'uncaptured python exception' not in log, log


# -- the client --

def exchange(server, data, pause=0.0, read_timeout=READ_TIMEOUT):
    """Send `data` (a list of pieces, sent `pause` s apart), read until the
    server closes the connection; the bytes received."""
    pieces = data if isinstance(data, list) else [data]
    with socket.create_connection(('127.0.0.1', server.port), timeout=read_timeout) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(pause)
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except socket.timeout:
            pytest.fail(f'the server kept the connection open; received {bytes(received)[:300]!r}')
        except ConnectionResetError:
            pass  # a reset after the last response: what was received counts
    return bytes(received)


def parse_responses(data):
    """[(status, {header: value}, body)] of every response in `data`."""
    responses = []
    while data:
        head, separator, data = data.partition(b'\r\n\r\n')
        assert separator, f'a truncated response head: {head[:200]!r}'
        lines = head.decode('latin-1').split('\r\n')
        assert lines[0].startswith('HTTP/1.'), f'not a status line: {lines[0]!r}'
        status = int(lines[0].split(' ', 2)[1])
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(':')
            assert colon and name == name.strip(), f'a bad response header line: {line!r}'
            headers[name.lower()] = value.strip()
        length = int(headers.get('content-length', 0)) if status >= 200 else 0
        body, data = data[:length], data[length:]
        responses.append((status, headers, body))
    return responses


def records(server, token):
    """What the application saw of the requests carrying `token`."""
    try:
        with open(server.app_log) as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if token in line]


def check(server, raw, statuses, seen, pause=0.0):
    """Send `raw` (its '{t}' replaced by a fresh token), assert the statuses
    received and the paths (with their token) the application saw; returns
    (responses, records)."""
    token = uuid.uuid4().hex[:12]
    pieces = [piece.replace(b'{t}', token.encode()) for piece in (raw if isinstance(raw, list) else [raw])]
    responses = parse_responses(exchange(server, pieces, pause))
    time.sleep(0.05)  # a request run in spite of all would be logged by now
    saw = records(server, token)
    assert [status for status, _, _ in responses] == statuses, responses
    assert [entry['PATH_INFO'].replace(token, '') for entry in saw] == seen, saw
    return responses, saw


def req(head, body=b'', path=b'/{t}', method=b'POST', version=b'HTTP/1.1', host=True, close=True):
    """A request: the request line, Host, `head` (header lines, CRLF ended),
    Connection: close, and the body as given."""
    lines = method + b' ' + path + b' ' + version + b'\r\n'
    if host:
        lines += b'Host: example.com\r\n'
    if close:
        lines += b'Connection: close\r\n'
    return lines + head + b'\r\n' + body


SMUGGLED = b'GET /{t}smuggled HTTP/1.1\r\nHost: example.com\r\n\r\n'


# -- 1. Content-Length (RFC 9112 6.2, 6.3; CVE-2019-16792, CVE-2022-24761) --

BAD_CONTENT_LENGTHS = {
    'two-equal': b'Content-Length: 35\r\nContent-Length: 35\r\n',
    'two-different': b'Content-Length: 35\r\nContent-Length: 0\r\n',
    'list': b'Content-Length: 35, 35\r\n',
    'letters': b'Content-Length: 35x\r\n',
    'negative': b'Content-Length: -35\r\n',
    'hex': b'Content-Length: 0x23\r\n',
    'empty': b'Content-Length: \r\n',
    'two-numbers': b'Content-Length: 3 5\r\n',
    '4400-digits': b'Content-Length: ' + b'9' * 4400 + b'\r\n',
    'plus': b'Content-Length: +35\r\n',
    'underscore-digits': b'Content-Length: 3_5\r\n',
    'leading-vt': b'Content-Length: \x0b35\r\n',
    'space-before-colon': b'Content-Length : 35\r\n',
    'tab-before-colon': b'Content-Length\t: 35\r\n',
}


@pytest.mark.parametrize('header', BAD_CONTENT_LENGTHS.values(), ids=BAD_CONTENT_LENGTHS.keys())
def test_an_unreadable_content_length_is_400_and_nothing_runs(strict_server, header):
    responses, _ = check(strict_server, req(header, body=SMUGGLED, close=False), [400], [])
    assert responses[0][1]['connection'] == 'close'


@pytest.mark.parametrize('value,length', [(b'005', '5'), (b'5 ', '5'), (b' 5', '5')])
def test_a_valid_content_length_is_read_exactly(strict_server, value, length):
    _, saw = check(strict_server, req(b'Content-Length: ' + value + b'\r\n', body=b'abcde'), [200], ['/'])
    assert saw[0]['CONTENT_LENGTH'] == length and saw[0]['body'] == 'abcde'


def test_a_request_inside_a_body_stays_a_body(strict_server):
    body = SMUGGLED.replace(b'{t}', b'X')
    _, saw = check(strict_server, req(b'Content-Length: %d\r\n' % len(body), body=body), [200], ['/'])
    assert saw[0]['body'] == body.decode()


def test_content_length_with_an_underscore_is_no_content_length(strict_server):
    # Dropped like any name with "_": the bytes after the head are the next
    # request (here not one: a line that is no method and SP), never a body.
    check(strict_server, req(b'Content_Length: 5\r\n', body=b'abcde\r\n', close=False), [200, 400], ['/'])


# -- 2. Transfer-Encoding (RFC 9112 6.1, 7; CVE-2019-16786, CVE-2024-1135, CVE-2024-6827) --

CHUNKED_BODY = b'5\r\nabcde\r\n0\r\n\r\n'

BAD_TRANSFER_ENCODINGS = {
    'gzip-chunked': (b'Transfer-Encoding: gzip, chunked\r\n', 501),
    'gzip': (b'Transfer-Encoding: gzip\r\n', 501),
    'identity': (b'Transfer-Encoding: identity\r\n', 501),
    'xchunked': (b'Transfer-Encoding: xchunked\r\n', 501),
    'chunked-identity': (b'Transfer-Encoding: chunked, identity\r\n', 400),
    'chunked-twice-in-one': (b'Transfer-Encoding: chunked, chunked\r\n', 400),
    'two-headers': (b'Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n', 400),
    'gzip-then-chunked-headers': (b'Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n', 501),
    'space-before-colon': (b'Transfer-Encoding : chunked\r\n', 400),
    'leading-vt': (b'Transfer-Encoding: \x0bchunked\r\n', 400),
    'trailing-vt': (b'Transfer-Encoding: chunked\x0b\r\n', 400),
    'with-content-length': (b'Transfer-Encoding: chunked\r\nContent-Length: 15\r\n', 400),
    'content-length-first': (b'Content-Length: 15\r\nTransfer-Encoding: chunked\r\n', 400),
    'with-content-length-keep-alive': (b'Connection: keep-alive\r\nContent-Length: 4\r\n'
                                       b'Transfer-Encoding: chunked\r\n', 400),
}


@pytest.mark.parametrize('header,status', BAD_TRANSFER_ENCODINGS.values(), ids=BAD_TRANSFER_ENCODINGS.keys())
def test_an_unusable_transfer_encoding_is_refused_and_nothing_runs(strict_server, header, status):
    responses, _ = check(strict_server, req(header, body=CHUNKED_BODY + SMUGGLED, close=False), [status], [])
    assert responses[0][1]['connection'] == 'close'


def test_transfer_encoding_in_http_1_0_is_400(strict_server):
    # RFC 9112 6.1: the framing of such a message is faulty.
    check(strict_server, req(b'Transfer-Encoding: chunked\r\n', body=CHUNKED_BODY + SMUGGLED,
                             version=b'HTTP/1.0', close=False), [400], [])


@pytest.mark.parametrize('value', [b'chunked', b'Chunked', b'CHUNKED', b'chunked '])
def test_chunked_is_recognised_in_any_case(strict_server, value):
    # Transfer-coding names are case-insensitive (RFC 9112 7).
    _, saw = check(strict_server, req(b'Transfer-Encoding: ' + value + b'\r\n', body=CHUNKED_BODY), [200], ['/'])
    assert saw[0]['body'] == 'abcde'


# -- 3. header fields (RFC 9110 5.5, RFC 9112 5; CVE-2019-16789, CVE-2020-5236) --

BAD_FIELDS = {
    'vt-in-value': b'X-Test: a\x0bb\r\n',
    'ff-in-value': b'X-Test: a\x0cb\r\n',
    'nul-in-value': b'X-Test: a\x00b\r\n',
    'soh-in-value': b'X-Test: a\x01b\r\n',
    'del-in-value': b'X-Test: a\x7fb\r\n',
    'esc-in-value': b'X-Test: a\x1bb\r\n',
    'space-in-name': b'X Test: a\r\n',
    'no-colon': b'Garbage line\r\n',
    'empty-name': b': a\r\n',
    'non-ascii-name': b'X-T\xe9st: a\r\n',
    'quote-in-name': b'X-"Test": a\r\n',
    'obs-fold': b'X-Test: a\r\n  b\r\n',
    'obs-fold-tab': b'X-Test: a\r\n\tb\r\n',
    'nul-in-name': b'X-T\x00est: a\r\n',
}


@pytest.mark.parametrize('field', BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_a_malformed_header_field_is_400(strict_server, field):
    check(strict_server, req(field), [400], [])


def test_a_first_header_line_starting_with_a_space_is_400(strict_server):
    check(strict_server, b'GET /{t} HTTP/1.1\r\n Host: example.com\r\nConnection: close\r\n\r\n', [400], [])


def test_a_header_name_with_an_underscore_is_dropped(strict_server):
    _, saw = check(strict_server, req(b'X-Forwarded_For: 6.6.6.6\r\n'), [200], ['/'])
    assert 'HTTP_X_FORWARDED_FOR' not in saw[0]


def test_an_underscore_name_cannot_shadow_the_proxys_header(strict_server):
    for order in ([b'X-Forwarded-For: 1.2.3.4\r\n', b'X-Forwarded_For: 6.6.6.6\r\n'],
                  [b'X-Forwarded_For: 6.6.6.6\r\n', b'X-Forwarded-For: 1.2.3.4\r\n']):
        _, saw = check(strict_server, req(b''.join(order)), [200], ['/'])
        assert saw[0]['HTTP_X_FORWARDED_FOR'] == '1.2.3.4'


@pytest.mark.parametrize('value,seen', [
    (b'  a b \t', 'a b'),            # only SP and HTAB around a value are dropped (RFC 9110 5.5)
    (b'\xa0a\xa0', '\xa0a\xa0'),     # NBSP is obs-text: kept, not stripped
    (b'\x85a\x85', '\x85a\x85'),     # NEL likewise
    (b'a\tb', 'a\tb'),               # HTAB inside a value is allowed
], ids=['sp-htab', 'nbsp', 'nel', 'inner-tab'])
def test_header_values_are_trimmed_of_sp_and_htab_only(strict_server, value, seen):
    _, saw = check(strict_server, req(b'X-Test:' + value + b'\r\n'), [200], ['/'])
    assert saw[0]['HTTP_X_TEST'] == seen


def test_a_duplicated_host_is_400(strict_server):
    check(strict_server, req(b'Host: evil.example\r\n'), [400], [])


def test_http_1_1_without_host_is_400(strict_server):
    check(strict_server, req(b'', host=False), [400], [])


def test_http_1_0_without_host_is_served(strict_server):
    check(strict_server, req(b'', host=False, version=b'HTTP/1.0'), [200], ['/'])


def test_repeated_fields_are_joined(strict_server):
    _, saw = check(strict_server, req(b'X-Test: 1\r\nX-Test: 2\r\nCookie: a=1\r\nCookie: b=2\r\n'), [200], ['/'])
    assert saw[0]['HTTP_X_TEST'] == '1, 2' and saw[0]['HTTP_COOKIE'] == 'a=1; b=2'


# -- 4. chunked bodies (RFC 9112 7.1; CVE-2022-24761) --

BAD_CHUNKED_BODIES = {
    'size-0x': b'0x5\r\nabcde\r\n0\r\n\r\n',
    'size-plus': b'+5\r\nabcde\r\n0\r\n\r\n',
    'size-minus': b'-5\r\nabcde\r\n0\r\n\r\n',
    'size-underscore': b'0_5\r\nabcde\r\n0\r\n\r\n',
    'size-leading-space': b' 5\r\nabcde\r\n0\r\n\r\n',
    'size-trailing-space': b'5 \r\nabcde\r\n0\r\n\r\n',
    'size-not-hex': b'zz\r\nabcde\r\n0\r\n\r\n',
    'size-overflow': b'fffffffffffffffffff\r\nabcde\r\n0\r\n\r\n',
    'data-without-crlf': b'5\r\nabcde0\r\n\r\n',
    'data-longer-than-size': b'3\r\nabcde\r\n0\r\n\r\n',
    'blank-line-between-chunks': b'5\r\nabcde\r\n\r\n0\r\n\r\n',
    'bare-lf-after-size': b'5\nabcde\r\n0\r\n\r\n',
    'bare-lf-after-data': b'5\r\nabcde\n0\r\n\r\n',
    'cr-in-extension': b'5;a\rb\r\nabcde\r\n0\r\n\r\n',
    'nul-in-extension': b'5;a=\x00\r\nabcde\r\n0\r\n\r\n',
    'ctl-in-quoted-extension': b'5;a="\x01"\r\nabcde\r\n0\r\n\r\n',
    'request-as-trailer': b'5\r\nabcde\r\n0\r\nGET /{t}smuggled HTTP/1.1\r\nHost: example.com\r\n\r\n',
}


@pytest.mark.parametrize('body', BAD_CHUNKED_BODIES.values(), ids=BAD_CHUNKED_BODIES.keys())
def test_a_malformed_chunked_body_is_400_and_nothing_runs(strict_server, body):
    responses, _ = check(strict_server, req(b'Transfer-Encoding: chunked\r\n', body=body + SMUGGLED, close=False),
                         [400], [])
    assert responses[0][2].startswith(b'Bad Request')


@pytest.mark.parametrize('body,seen', [
    (b'5;name=value\r\nabcde\r\n0\r\n\r\n', 'abcde'),
    (b'5;name="quoted value"\r\nabcde\r\n0\r\n\r\n', 'abcde'),
    (b'0005\r\nabcde\r\n0\r\n\r\n', 'abcde'),
    (b'5\r\nabcde\r\n0\r\nX-Trailer: yes\r\n\r\n', 'abcde'),
    (b'3\r\nabc\r\n2\r\nde\r\nA\r\n0123456789\r\n0\r\n\r\n', 'abcde0123456789'),
    (b'4\r\n\r\n\r\n\r\n0\r\n\r\n', '\r\n\r\n'),
], ids=['extension', 'quoted-extension', 'leading-zeros', 'trailer', 'several-chunks', 'crlfs-as-data'])
def test_a_valid_chunked_body_is_read_whole(strict_server, body, seen):
    _, saw = check(strict_server, req(b'Transfer-Encoding: chunked\r\n', body=body), [200], ['/'])
    assert saw[0]['body'] == seen
    assert saw[0]['CONTENT_LENGTH'] == str(len(seen)) and saw[0]['wsgi.input_terminated'] is True


def test_a_request_after_a_chunked_body_is_the_next_request(strict_server):
    raw = req(b'Transfer-Encoding: chunked\r\n', body=CHUNKED_BODY, close=False) + req(b'', path=b'/{t}next')
    check(strict_server, raw, [200, 200], ['/', '/next'])


# -- 5. line endings (RFC 9112 2.2; CVE-2019-16785) --

BAD_LINE_ENDINGS = {
    'bare-lf-everywhere': b'GET /{t} HTTP/1.1\nHost: example.com\nConnection: close\n\n',
    'bare-lf-after-request-line': b'GET /{t} HTTP/1.1\nHost: example.com\r\nConnection: close\r\n\r\n',
    'bare-lf-after-a-field': b'GET /{t} HTTP/1.1\r\nHost: example.com\nConnection: close\r\n\r\n',
    'crlf-lf-ends-the-head': b'GET /{t} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\n',
    'bare-cr-in-a-value': b'GET /{t} HTTP/1.1\r\nHost: example.com\r\nX-Test: a\rb\r\nConnection: close\r\n\r\n',
    'bare-cr-ends-a-field': b'GET /{t} HTTP/1.1\r\nHost: example.com\rX-Test: a\r\nConnection: close\r\n\r\n',
    'bare-cr-after-request-line': b'GET /{t} HTTP/1.1\rHost: example.com\r\nConnection: close\r\n\r\n',
    'lf-cr': b'GET /{t} HTTP/1.1\n\rHost: example.com\r\nConnection: close\r\n\r\n',
}


@pytest.mark.parametrize('raw', BAD_LINE_ENDINGS.values(), ids=BAD_LINE_ENDINGS.keys())
def test_a_line_not_ended_by_crlf_is_400(strict_server, raw):
    check(strict_server, raw + SMUGGLED, [400], [])


def test_empty_lines_before_a_request_are_ignored(strict_server):
    # RFC 9112 2.2: at least one empty line before the request line.
    check(strict_server, b'\r\n' + req(b''), [200], ['/'])


# -- 6. the request line (RFC 9112 3) --

BAD_REQUEST_LINES = {
    'version-suffix': (b'GET /{t} HTTP/1.1x\r\n', 400),
    'version-digits': (b'GET /{t} HTTP/111\r\n', 400),
    'protocol-ftp': (b'GET /{t} FTP/1.1\r\n', 400),
    'protocol-lowercase': (b'GET /{t} http/1.1\r\n', 400),
    'tab-after-method': (b'GET\t/{t} HTTP/1.1\r\n', 400),
    'tab-after-target': (b'GET /{t}\tHTTP/1.1\r\n', 400),
    'two-spaces-after-method': (b'GET  /{t} HTTP/1.1\r\n', 400),
    'two-spaces-after-target': (b'GET /{t}  HTTP/1.1\r\n', 400),
    'space-after-version': (b'GET /{t} HTTP/1.1 \r\n', 400),
    'leading-space': (b' GET /{t} HTTP/1.1\r\n', 400),
    'lowercase-method': (b'get /{t} HTTP/1.1\r\n', 501),  # a token, but no method (case-sensitive)
    'invalid-method': (b'G@T /{t} HTTP/1.1\r\n', 400),
    'no-method': (b'/{t} HTTP/1.1\r\n', 400),
    'space-in-target': (b'GET /{t} x HTTP/1.1\r\n', 400),
    'del-in-target': (b'GET /{t}\x7f HTTP/1.1\r\n', 400),
    'non-ascii-in-target': (b'GET /{t}\xe9 HTTP/1.1\r\n', 400),
    'fragment-in-target': (b'GET /{t}#frag HTTP/1.1\r\n', 400),
    'relative-target': (b'GET {t} HTTP/1.1\r\n', 400),
    'http-2.0': (b'GET /{t} HTTP/2.0\r\n', 505),
    'http-0.9': (b'GET /{t}\r\n', 505),
    'connect': (b'CONNECT example.com:443 HTTP/1.1\r\n', 501),
}


@pytest.mark.parametrize('line,status', BAD_REQUEST_LINES.values(), ids=BAD_REQUEST_LINES.keys())
def test_a_malformed_request_line_is_refused(strict_server, line, status):
    check(strict_server, line + b'Host: example.com\r\nConnection: close\r\n\r\n' + SMUGGLED, [status], [])


def test_absolute_form_uses_the_targets_authority(strict_server):
    # RFC 9112 3.2.2: the Host field is replaced by the target's authority.
    _, saw = check(strict_server, req(b'', path=b'http://other.example/{t}?q=1', method=b'GET'), [200], ['/'])
    assert saw[0]['QUERY_STRING'] == 'q=1' and saw[0]['HTTP_HOST'] == 'other.example'


def test_asterisk_form_for_options(strict_server):
    token = uuid.uuid4().hex[:12]
    data = exchange(strict_server, f'OPTIONS * HTTP/1.1\r\nHost: {token}\r\nConnection: close\r\n\r\n'.encode())
    assert [status for status, _, _ in parse_responses(data)] == [200]
    assert [entry['PATH_INFO'] for entry in records(strict_server, token)] == ['*']


# -- 7. sizes (the limits, with the small server's values) --

def test_a_request_line_over_limit_request_line_is_414(small_server):
    check(small_server, req(b'', path=b'/{t}' + b'a' * 100, method=b'GET'), [414], [])


def test_a_request_line_at_limit_request_line_is_served(small_server):
    line_left = 100 - len(b'GET /{t} HTTP/1.1') + 3 - 12  # the token is 12 characters
    check(small_server, req(b'', path=b'/{t}' + b'a' * line_left, method=b'GET'), [200], ['/' + 'a' * line_left])


def test_more_than_limit_request_fields_is_431(small_server):
    check(small_server, req(b'A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n'), [431], [])


def test_limit_request_fields_is_inclusive(small_server):
    check(small_server, req(b'A: 1\r\nB: 2\r\nC: 3\r\n'), [200], ['/'])


def test_a_field_over_limit_request_field_size_is_431(small_server):
    check(small_server, req(b'X-Big: ' + b'b' * 200 + b'\r\n'), [431], [])


def test_a_header_section_over_limit_request_header_size_is_431(small_server):
    check(small_server, req(b''.join(b'X-%d: %s\r\n' % (i, b'v' * 150) for i in range(3))
                            + b'X-More: ' + b'v' * 150 + b'\r\n'), [431], [])


def test_a_content_length_over_max_request_body_size_is_413_before_the_body(small_server):
    start = time.monotonic()
    responses, _ = check(small_server, req(b'Content-Length: 1001\r\n'), [413], [])
    assert time.monotonic() - start < 2


def test_a_body_at_max_request_body_size_is_served(small_server):
    _, saw = check(small_server, req(b'Content-Length: 1000\r\n', body=b'x' * 1000), [200], ['/'])
    assert len(saw[0]['body']) == 1000


def test_a_chunked_body_over_max_request_body_size_is_413(small_server):
    body = b'200\r\n' + b'x' * 512 + b'\r\n' + b'200\r\n' + b'y' * 512 + b'\r\n0\r\n\r\n'
    check(small_server, req(b'Transfer-Encoding: chunked\r\n', body=body), [413], [])


@pytest.mark.parametrize('stall', ['request-line', 'headers', 'body'])
def test_a_request_that_stops_arriving_is_408(small_server, stall):
    raw = req(b'Content-Length: 10\r\n', body=b'abc')
    cut = {'request-line': 6, 'headers': raw.index(b'Host') + 8, 'body': len(raw)}[stall]
    start = time.monotonic()
    check(small_server, raw[:cut], [408], [])
    assert 0.9 < time.monotonic() - start < 3.5  # request_read_timeout = 1, checked every second


def test_a_slow_trickle_of_headers_is_408(small_server):
    # Each byte resets no clock: the whole head must arrive within the timeout.
    raw = req(b'')
    token = uuid.uuid4().hex[:12]
    raw = raw.replace(b'{t}', token.encode())
    start = time.monotonic()
    with socket.create_connection(('127.0.0.1', small_server.port), timeout=READ_TIMEOUT) as sock:
        received = b''
        for i in range(len(raw) - 1):
            try:
                sock.sendall(raw[i:i + 1])
            except OSError:
                break
            time.sleep(0.1)
            if time.monotonic() - start > 4:
                break
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert [status for status, _, _ in parse_responses(received)] == [408]
    assert time.monotonic() - start < 4
    assert records(small_server, token) == []


# -- 8. pipelining and the end of a connection (RFC 9112 9.3, 9.6; CVE-2022-31015, CVE-2024-49768) --

PIPELINED_AFTER_CLOSE = {
    'connection-close': req(b'', close=True),
    'connection-close-uppercase': req(b'Connection: CLOSE\r\n', close=False),
    'connection-list-with-close': req(b'Connection: keep-alive, close\r\n', close=False),
    'http-1.0': req(b'', version=b'HTTP/1.0', close=False),
    'http-1.0-keep-alive-and-close': req(b'Connection: keep-alive\r\nConnection: close\r\n',
                                         version=b'HTTP/1.0', close=False),
}


@pytest.mark.parametrize('first', PIPELINED_AFTER_CLOSE.values(), ids=PIPELINED_AFTER_CLOSE.keys())
def test_nothing_pipelined_after_a_connection_ending_request_runs(strict_server, first):
    responses, _ = check(strict_server, first + SMUGGLED + SMUGGLED, [200], ['/'])
    assert responses[0][1]['connection'] == 'close'


def test_nothing_pipelined_after_a_slow_connection_ending_request_runs(strict_server):
    # The second request is in while the first still runs.
    check(strict_server, req(b'', path=b'/slow?ms=300&{t}', method=b'GET') + SMUGGLED, [200], ['/slow'])


def test_nothing_pipelined_after_a_refused_request_runs(strict_server):
    check(strict_server, req(b'Content-Length: 1x\r\n', close=False) + SMUGGLED, [400], [])


def test_pipelined_requests_run_in_order_up_to_the_closing_one(strict_server):
    raw = b''.join(req(b'', path=b'/{t}%d' % i, method=b'GET', close=False) for i in range(5))
    raw += req(b'', path=b'/{t}last', method=b'GET') + SMUGGLED
    check(strict_server, raw, [200] * 6, [f'/{i}' for i in range(5)] + ['/last'])


def test_requests_pipelined_behind_a_slow_one_do_not_run_once_the_client_is_gone(strict_server):
    # 20 000 requests behind one of 1 s; the client resets the connection
    # while the first runs. At most the one parsed ahead may run.
    token = uuid.uuid4().hex[:12]
    slow = f'GET /slow?ms=1000&{token} HTTP/1.1\r\nHost: x\r\n\r\n'.encode()
    many = b''.join(f'GET /{token}/{i} HTTP/1.1\r\nHost: x\r\n\r\n'.encode() for i in range(20000))
    sock = socket.create_connection(('127.0.0.1', strict_server.port))
    sock.setblocking(False)
    data = memoryview(slow + many)
    deadline = time.monotonic() + 0.5
    while data and time.monotonic() < deadline:
        try:
            data = data[sock.send(data):]
        except BlockingIOError:
            time.sleep(0.01)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
    sock.close()
    time.sleep(2.5)
    paths = [entry['PATH_INFO'] for entry in records(strict_server, token)]
    assert paths[0] == '/slow' and len(paths) <= 3, f'{len(paths)} requests ran: {paths[:5]}...'
    assert_workers_kept(strict_server)


def serving_worker(server, client_port):
    """The worker process that holds the connection from `client_port`."""
    for pid in server.worker_pids():
        for connection in psutil.Process(pid).net_connections(kind='tcp'):
            if connection.raddr and connection.raddr.port == client_port:
                return psutil.Process(pid)
    raise AssertionError(f'no worker holds the connection from port {client_port}')


def test_only_one_request_is_parsed_ahead_of_a_running_one(strict_server):
    # 20 000 requests pipelined behind one of 1.5 s: the server takes what
    # it needs for the next one and leaves the rest in the socket (zope.server
    # parsed and queued them all: 20 MB more in the worker).
    token = uuid.uuid4().hex[:12]
    slow = f'GET /slow?ms=1500&{token} HTTP/1.1\r\nHost: x\r\n\r\n'.encode()
    many = b''.join(f'GET /{token}/{i} HTTP/1.1\r\nHost: x\r\n\r\n'.encode() for i in range(20000))
    with socket.create_connection(('127.0.0.1', strict_server.port)) as sock:
        sock.sendall(slow)
        worker = wait_until(lambda: records(strict_server, token) and serving_worker(
            strict_server, sock.getsockname()[1]), message='the slow request running')
        before = worker.memory_info().rss
        sock.setblocking(False)
        data = memoryview(many)
        deadline = time.monotonic() + 1.0
        while data and time.monotonic() < deadline:
            try:
                data = data[sock.send(data):]
            except BlockingIOError:
                time.sleep(0.01)
        time.sleep(0.2)
        grown = worker.memory_info().rss - before
        assert [entry['PATH_INFO'] for entry in records(strict_server, token)] == ['/slow']
        assert grown < 2 << 20, f'the worker grew by {grown >> 10} KiB while the requests waited'


# -- 9. response splitting (RFC 9110 5.5) --

@pytest.mark.parametrize('part', ['name', 'value', 'status'])
@pytest.mark.parametrize('char', ['cr', 'lf', 'nul'])
def test_cr_lf_or_nul_in_a_response_header_is_a_500(strict_server, part, char):
    token = uuid.uuid4().hex[:12]
    raw = f'GET /bad-header?part={part}&char={char}&{token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
    data = exchange(strict_server, raw.encode())
    assert b'X-Injected' not in data and b'Injected' not in data, data
    assert [status for status, _, _ in parse_responses(data)] == [500]
    assert [entry['PATH_INFO'] for entry in records(strict_server, token)] == ['/bad-header']
    wait_until(lambda: 'ValueError: ' in strict_server.log(), timeout=5,
               message="the application's error in the log")


# -- 10. Expect: 100-continue (RFC 9110 10.1.1) --

def read_until(sock, marker, timeout=2.0):
    sock.settimeout(timeout)
    data = b''
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_100_continue_when_the_application_reads_the_body(strict_server):
    token = uuid.uuid4().hex[:12]
    head = (f'POST /{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n'
            'Connection: close\r\n\r\n').encode()
    with socket.create_connection(('127.0.0.1', strict_server.port)) as sock:
        start = time.monotonic()
        sock.sendall(head)
        interim = read_until(sock, b'\r\n\r\n', timeout=0.5)
        assert interim == b'HTTP/1.1 100 Continue\r\n\r\n'
        assert time.monotonic() - start < 0.5
        sock.sendall(b'abcde')
        data = read_until(sock, b'"body"')
        while chunk := sock.recv(65536):
            data += chunk
    assert [status for status, _, _ in parse_responses(data)] == [200]
    assert [entry['body'] for entry in records(strict_server, token)] == ['abcde']


def test_100_continue_with_a_chunked_body(strict_server):
    token = uuid.uuid4().hex[:12]
    head = (f'POST /{token} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n'
            'Connection: close\r\n\r\n').encode()
    with socket.create_connection(('127.0.0.1', strict_server.port)) as sock:
        sock.sendall(head)
        assert read_until(sock, b'\r\n\r\n', timeout=0.5) == b'HTTP/1.1 100 Continue\r\n\r\n'
        sock.sendall(b'3\r\nabc\r\n')
        time.sleep(0.05)
        sock.sendall(b'2\r\nde\r\n0\r\n\r\n')
        data = read_until(sock, b'"body"')
        while chunk := sock.recv(65536):
            data += chunk
    assert [status for status, _, _ in parse_responses(data)] == [200]
    saw = records(strict_server, token)
    assert [entry['body'] for entry in saw] == ['abcde'] and 'CONTENT_LENGTH' not in saw[0]


def test_a_client_that_leaves_in_the_middle_of_a_continued_body(strict_server):
    # The application is reading the body as it arrives: its read fails
    # (OSError) instead of waiting for ever, and the worker lives on.
    token = uuid.uuid4().hex[:12]
    head = (f'POST /{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n'
            '\r\n').encode()
    with socket.create_connection(('127.0.0.1', strict_server.port)) as sock:
        sock.sendall(head)
        assert read_until(sock, b'\r\n\r\n', timeout=0.5) == b'HTTP/1.1 100 Continue\r\n\r\n'
        sock.sendall(b'only part of it')
        time.sleep(0.1)
    wait_until(lambda: 'the request body was not received' in strict_server.log(), timeout=5,
               message="the application's failed read in the log")
    assert records(strict_server, token) == []  # echoapp records after reading the body
    check(strict_server, req(b''), [200], ['/'])
    assert_workers_kept(strict_server)


def test_no_100_continue_when_the_application_answers_without_reading(strict_server):
    token = uuid.uuid4().hex[:12]
    head = (f'POST /noread?{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n'
            '\r\n').encode()
    data = exchange(strict_server, head)
    responses = parse_responses(data)
    # The body was never sent: the connection cannot go on.
    assert [status for status, _, _ in responses] == [200] and responses[0][1]['connection'] == 'close'
    assert [entry['PATH_INFO'] for entry in records(strict_server, token)] == ['/noread']


def test_no_100_continue_for_a_body_that_is_too_large(small_server):
    data = exchange(small_server, req(b'Content-Length: 5000\r\nExpect: 100-continue\r\n').replace(b'{t}', b'x'))
    assert [status for status, _, _ in parse_responses(data)] == [413]


# -- 11. the WSGI environ (PEP 3333) --

def test_path_info_is_latin_1_of_the_unquoted_bytes(strict_server):
    seen = []
    for path in (b'/%ff', b'/%fe', b'/%C3%A9', b'/a%2Fb', b'/a%20b'):
        _, saw = check(strict_server, req(b'', path=path + b'?{t}', method=b'GET'), [200],
                       [path.decode().replace('%ff', '\xff').replace('%fe', '\xfe').replace('%C3%A9', '\xc3\xa9')
                        .replace('%2F', '/').replace('%20', ' ')])
        seen.append(saw[0]['PATH_INFO'])
    assert len(set(seen)) == len(seen)


def test_query_string_is_not_unquoted(strict_server):
    _, saw = check(strict_server, req(b'', path=b'/{t}?a=%20b&c=%ff', method=b'GET'), [200], ['/'])
    assert saw[0]['QUERY_STRING'] == 'a=%20b&c=%ff'


def test_connection_is_http_connection(strict_server):
    _, saw = check(strict_server, req(b''), [200], ['/'])
    assert saw[0]['HTTP_CONNECTION'] == 'close' and 'CONNECTION_TYPE' not in saw[0]


def test_content_length_is_absent_without_a_body(strict_server):
    _, saw = check(strict_server, req(b'', method=b'GET'), [200], ['/'])
    assert 'CONTENT_LENGTH' not in saw[0] and saw[0]['body'] == ''


# -- denial of service: answered fast, no worker lost --

def test_an_8_kb_request_line_is_414_within_100_ms(strict_server):
    token = uuid.uuid4().hex[:12]
    raw = f'GET /{token}{"a" * 8192} HTTP/1.1\r\nHost: x\r\n\r\n'.encode()
    with socket.create_connection(('127.0.0.1', strict_server.port), timeout=READ_TIMEOUT) as sock:
        exchange(strict_server, b'GET /warm-up HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        start = time.monotonic()
        sock.sendall(raw)
        head = read_until(sock, b'\r\n\r\n')
        elapsed = time.monotonic() - start
    assert head.startswith(b'HTTP/1.1 414 '), head
    assert elapsed < 0.1, f'414 after {elapsed * 1000:.0f} ms'
    assert records(strict_server, token) == []
    assert_workers_kept(strict_server)


@pytest.mark.parametrize('size', [17 << 10, 64 << 10, 1 << 20])
def test_long_request_lines_again_and_again_are_414(strict_server, size):
    token = uuid.uuid4().hex[:12]
    raw = f'GET /{token}{"a" * size} HTTP/1.1\r\nHost: x\r\n\r\n'.encode()
    start = time.monotonic()
    for _ in range(4):
        responses = parse_responses(exchange(strict_server, raw))
        assert [status for status, _, _ in responses] == [414]
    assert time.monotonic() - start < 2
    assert records(strict_server, token) == []
    assert_workers_kept(strict_server)


@pytest.mark.parametrize('shape', ['one-field', 'many-fields', 'many-small-fields'])
def test_a_1_mb_header_block_is_431(strict_server, shape):
    fields = {'one-field': b'X-Big: ' + b'b' * (1 << 20) + b'\r\n',
              'many-fields': b''.join(b'X-%d: %s\r\n' % (i, b'b' * 8000) for i in range(130)),
              'many-small-fields': b''.join(b'X-%d: b\r\n' % i for i in range(100000))}[shape]
    start = time.monotonic()
    check(strict_server, req(fields), [431], [])
    assert time.monotonic() - start < 2
    assert_workers_kept(strict_server)


def test_a_10_gib_content_length_is_413_at_once(strict_server):
    start = time.monotonic()
    check(strict_server, req(b'Content-Length: %d\r\n' % (10 << 30)), [413], [])
    assert time.monotonic() - start < 2
    assert_workers_kept(strict_server)


def test_the_server_still_serves_and_no_worker_was_lost(strict_server):
    check(strict_server, req(b''), [200], ['/'])
    assert_workers_kept(strict_server)


# -- the options (checked with the others in zkprefork.settings) --

def test_the_http_options_default_to_their_documented_values():
    from zkprefork.worker.httprequest import HTTPOptions
    from zkprefork.settings import make_settings
    assert HTTPOptions.from_settings(make_settings({})) == HTTPOptions(
        limit_request_line=4094, limit_request_fields=200, limit_request_field_size=65536,
        limit_request_header_size=262144, max_request_body_size=1 << 30, request_read_timeout=30.0,
        request_body_min_rate=500, keepalive=2.0, outbuf_high_watermark=4 << 20, send_timeout=60.0,
        forwarded_allow_ips=('127.0.0.1/32',))


@pytest.mark.parametrize('option,value', [
    ('limit_request_line', '10'), ('limit_request_line', 'x'), ('limit_request_fields', '0'),
    ('limit_request_field_size', '-1'), ('limit_request_header_size', '1.5'),
    ('max_request_body_size', '-1'), ('request_read_timeout', '0'), ('request_read_timeout', 'soon'),
    ('outbuf_high_watermark', '1000'), ('send_timeout', '0'), ('forwarded_allow_ips', '10.0.0.300'),
    ('forwarded_allow_ips', '*, 10.0.0.1'),
])
def test_a_bad_http_option_is_a_one_line_error(option, value):
    from zkprefork.settings import ConfigError, make_settings
    with pytest.raises(ConfigError, match=f'^{option}: ') as caught:
        make_settings({option: value})
    assert '\n' not in str(caught.value)
