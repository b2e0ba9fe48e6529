"""The findings of a black-box security test of the HTTP layer
(findings F2, F5, F7, F3, F4), each as raw requests sent to real zkprefork
workers (2 x 4 threads) serving tests/echoapp.py: every case asserts what
the client receives AND what the application saw (see test_http_strict)."""
import pytest

from test_http_strict import CHUNKED_BODY, SMUGGLED, assert_workers_kept, check, req, start_echo_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp('findings'))
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
