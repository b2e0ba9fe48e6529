"""TLS on the listening socket, with real clients (Python's ssl and
http.client, curl, openssl s_client) against real zkprefork processes."""
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from support import make_tls_files, node_data, read_curator_instance, wait_until
from test_operations import ask, monitor_of

TLS_APP = '''\
import json
import os

KEYS = ('wsgi.url_scheme', 'HTTPS', 'SSL_PROTOCOL', 'SSL_CIPHER', 'SSL_CLIENT_VERIFY',
        'SSL_CLIENT_S_DN', 'SSL_CLIENT_I_DN', 'SSL_CLIENT_CERT', 'SSL_CLIENT_SAN_DNS_0',
        'SSL_CLIENT_SAN_URI_0')


def app(environ, start_response):
    path = environ['PATH_INFO']
    if path == '/file':
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return environ['wsgi.file_wrapper'](open(__file__, 'rb'))
    if path == '/chunks':
        start_response('200 OK', [])
        return (b'chunk %d\\n' % n for n in range(100))
    if path == '/echo':
        body = environ['wsgi.input'].read()
        start_response('200 OK', [('Content-Length', str(len(body)))])
        return [body]
    found = {key: environ[key] for key in KEYS if key in environ}
    found['pid'] = os.getpid()
    body = json.dumps(found).encode()
    start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])
    return [body]


def factory(global_conf, **local):
    return app
'''


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    return make_tls_files(str(tmp_path_factory.mktemp('pki')))


@pytest.fixture
def tls_server(servers, ini, tmp_path, pki):
    """tls_server(options) -> a serving zkprefork with TLS on (server.pem
    holds key and certificate) and the app above."""
    (tmp_path / 'tlsapp.py').write_text(TLS_APP)

    def start(options='', env=None, certfile=pki['server']):
        config = ini(f'host = 127.0.0.1\ncertfile = {certfile}\n{options}', app='call:tlsapp:factory')
        server = servers(config, env={'PYTHONPATH': str(tmp_path), **(env or {})})
        server.wait_serving()
        return server
    return start


def client_context(pki, cert=None, **versions):
    context = ssl.create_default_context(cafile=pki['ca'])
    if cert:
        context.load_cert_chain(pki[f'{cert}_cert'], pki[f'{cert}_key'])
    for name, value in versions.items():
        setattr(context, name, value)
    return context


def get(server, pki, path='/', cert=None, method='GET', body=None):
    connection = http.client.HTTPSConnection('127.0.0.1', server.port, timeout=10,
                                             context=client_context(pki, cert))
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def handshake_error(server, pki, cert=None, **versions):
    """The exception a client gets trying to handshake and read a response."""
    sock = socket.create_connection(('127.0.0.1', server.port), timeout=10)
    try:
        with client_context(pki, cert, **versions).wrap_socket(sock, server_hostname='127.0.0.1') as tls:
            # TLS 1.3: a refused client certificate shows at the first read.
            tls.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            return None if tls.recv(100) else 'closed'
    except (ssl.SSLError, ConnectionError) as error:
        return error


def still_serving(server, pki, cert=None):
    """The same worker answers: none was stuck or killed."""
    pids = server.worker_pids()
    assert get(server, pki, cert=cert)[0] == 200
    assert server.worker_pids() == pids


def test_https_serves_with_mod_ssl_environ(tls_server, pki):
    server = tls_server('workers = 2\n')
    status, body = get(server, pki)
    found = json.loads(body)
    assert status == 200
    assert found['wsgi.url_scheme'] == 'https' and found['HTTPS'] == 'on'
    assert found['SSL_PROTOCOL'] in ('TLSv1.2', 'TLSv1.3') and found['SSL_CIPHER']
    assert found['SSL_CLIENT_VERIFY'] == 'NONE' and 'SSL_CLIENT_CERT' not in found
    assert 'https://127.0.0.1:' in server.log()


def test_mutual_tls(tls_server, pki):
    server = tls_server(f'ca_certs = {pki["ca"]}\n')  # cert_reqs defaults to required
    status, body = get(server, pki, cert='client')
    found = json.loads(body)
    assert status == 200
    assert found['SSL_CLIENT_VERIFY'] == 'SUCCESS'
    assert (found['SSL_CLIENT_S_DN'], found['SSL_CLIENT_I_DN']) == ('CN=client', 'CN=test CA')
    with open(pki['client_cert']) as file:
        assert found['SSL_CLIENT_CERT'].split() == file.read().split()
    assert handshake_error(server, pki) is not None  # no certificate
    assert handshake_error(server, pki, cert='rogue_client') is not None  # another CA's
    still_serving(server, pki, cert='client')


def test_optional_client_certificates(tls_server, pki):
    server = tls_server(f'ca_certs = {pki["ca"]}\ncert_reqs = optional\n')
    assert json.loads(get(server, pki)[1])['SSL_CLIENT_VERIFY'] == 'NONE'
    assert json.loads(get(server, pki, cert='client')[1])['SSL_CLIENT_VERIFY'] == 'SUCCESS'


def test_old_versions_plain_http_and_garbage_are_refused(tls_server, pki):
    server = tls_server()
    error = handshake_error(server, pki, minimum_version=ssl.TLSVersion.TLSv1,
                            maximum_version=ssl.TLSVersion.TLSv1_1)
    assert error is not None
    with socket.create_connection(('127.0.0.1', server.port), timeout=10) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        assert _read_until_closed(sock) == b''  # no plaintext answer: TLS or nothing
    with socket.create_connection(('127.0.0.1', server.port), timeout=10) as sock:
        sock.sendall(os.urandom(3000))
        _read_until_closed(sock)
    still_serving(server, pki)
    server.wait_for_log(r'TLS handshake with 127\.0\.0\.1 failed')


def _read_until_closed(sock):
    data = b''
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_stalled_handshake_holds_no_thread_and_is_closed(tls_server, pki):
    """...and counts in the worker's `connections` while it is open (a
    handshake flood shows where an operator looks)."""
    server = tls_server('threads = 1\nrequest_read_timeout = 1\nmonitor_server = 127.0.0.1:0\n')
    stalled = [socket.create_connection(('127.0.0.1', server.port), timeout=10) for _ in range(3)]
    half = socket.create_connection(('127.0.0.1', server.port), timeout=10)
    half.sendall(b'\x16\x03\x01\x00\xff')  # a ClientHello's record header, then nothing
    try:
        wait_until(lambda: worker_connections(server) == 4, timeout=1, interval=0.02,
                   message='the four handshakes counted as connections')
        still_serving(server, pki)  # one thread, four stalled handshakes
        started = time.monotonic()
        for sock in [*stalled, half]:
            assert _read_until_closed(sock) == b''
        assert time.monotonic() - started < 5
        wait_until(lambda: worker_connections(server) == 0, timeout=2, message='no connection counted')
    finally:
        for sock in [*stalled, half]:
            sock.close()


def worker_connections(server):
    return json.loads(ask(monitor_of(server), b'status\n'))['workers'][0]['connections']


def _resumed_get(server, context, session):
    """(session_reused, the answering worker's pid, the session to offer next)."""
    sock = socket.create_connection(('127.0.0.1', server.port), timeout=10)
    with context.wrap_socket(sock, server_hostname='127.0.0.1', session=session) as tls:
        tls.sendall(b'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        answer = _read_until_closed(tls)  # TLS 1.3: the tickets come after the handshake
        return tls.session_reused, json.loads(answer.partition(b'\r\n\r\n')[2])['pid'], tls.session


@pytest.mark.parametrize('version', [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=['TLSv1.3', 'TLSv1.2'])
def test_a_session_resumes_on_any_worker(tls_server, pki, version):
    """The workers share their session ticket keys (the master makes the
    context before it forks them): a session from one worker resumes on another."""
    server = tls_server('workers = 2\nthreads = 1\n')
    context = client_context(pki, maximum_version=version)
    _, first, session = _resumed_get(server, context, None)
    resumed = {}
    for _ in range(300):  # until a resumption has landed on the other worker too (a few ms each)
        reused, pid, _ = _resumed_get(server, context, session)
        resumed.setdefault(pid, []).append(reused)
        if len(resumed) == 2:
            break
    assert len(resumed) == 2, f'every connection went to one worker: {resumed}'
    assert all(all(reused) for reused in resumed.values()), resumed


def test_keep_alive_chunked_streaming_file_wrapper_and_bodies(tls_server, pki):
    server = tls_server('threads = 2\n')
    connection = http.client.HTTPSConnection('127.0.0.1', server.port, timeout=10,
                                             context=client_context(pki))
    try:
        seen = set()
        for path in ('/', '/chunks', '/file', '/'):
            connection.request('GET', path)
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200
            seen.add(connection.sock.fileno())
        assert body and len(seen) == 1  # one connection throughout
        connection.request('POST', '/echo', body=(b'x' * 1000 for _ in range(300)),
                           encode_chunked=True, headers={'Transfer-Encoding': 'chunked'})
        assert connection.getresponse().read() == b'x' * 300000
        connection.request('GET', '/file')
        with open(os.path.join(os.path.dirname(server.log_path), 'tlsapp.py'), 'rb') as file:
            assert connection.getresponse().read() == file.read()
    finally:
        connection.close()


@pytest.mark.skipif(not shutil.which('curl'), reason='curl is not installed')
def test_curl_keep_alive_and_100_continue(tls_server, pki):
    server = tls_server(f'ca_certs = {pki["ca"]}\n')
    url = f'https://127.0.0.1:{server.port}'
    result = subprocess.run(
        ['curl', '-sS', '--cacert', pki['ca'], '--cert', pki['client_cert'], '--key', pki['client_key'],
         '-H', 'Expect: 100-continue', '--data-binary', 'x' * 5000, f'{url}/echo', '-o', '/dev/null',
         '--next', '--cacert', pki['ca'], '--cert', pki['client_cert'], '--key', pki['client_key'],
         f'{url}/', '-w', '%{num_connects} %{http_code}\n'],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith('0 200')  # the second request reused the connection
    assert json.loads(result.stdout.split('}')[0] + '}')['SSL_CLIENT_VERIFY'] == 'SUCCESS'


@pytest.mark.skipif(not shutil.which('openssl'), reason='openssl is not installed')
def test_openssl_s_client_sees_alpn_and_no_renegotiation(tls_server, pki):
    server = tls_server()
    result = subprocess.run(
        ['openssl', 's_client', '-connect', f'127.0.0.1:{server.port}', '-CAfile', pki['ca'],
         '-alpn', 'h2,http/1.1', '-tls1_2'],
        input='R\n', capture_output=True, text=True, timeout=30)
    assert 'ALPN protocol: http/1.1' in result.stdout
    assert 'Verify return code: 0 (ok)' in result.stdout
    assert 'Secure Renegotiation IS NOT supported' in result.stdout or 'RENEGOTIATING' in result.stderr
    still_serving(server, pki)


def _peer_subject(server, pki):
    context = ssl.create_default_context(cafile=pki['ca'])
    with socket.create_connection(('127.0.0.1', server.port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname='127.0.0.1') as tls:
            return dict(item for rdn in tls.getpeercert()['subject'] for item in rdn)['commonName']


def _subject_seen(server, pki):
    """The CN of the certificate a new connection gets, if `pki`'s CA trusts it."""
    try:
        return _peer_subject(server, pki)
    except ssl.SSLCertVerificationError:
        return None


def test_rotation_on_hup_and_a_bad_file_keeps_the_old_one(tls_server, pki, tmp_path):
    live = tmp_path / 'live.pem'
    shutil.copy(pki['server'], live)
    server = tls_server('workers = 2\n', certfile=live)
    assert _peer_subject(server, pki) == 'server'
    connection = http.client.HTTPSConnection('127.0.0.1', server.port, timeout=10,
                                             context=client_context(pki))
    connection.request('GET', '/')
    connection.getresponse().read()
    (tmp_path / 'renewed').mkdir()
    renewed = dict(pki, **make_tls_files(str(tmp_path / 'renewed')))  # another CA's certificate
    shutil.copy(renewed['server'], live)
    server.signal(signal.SIGHUP)
    wait_until(lambda: _subject_seen(server, renewed) == 'server', timeout=20,
               message='new connections to get the new certificate')
    wait_until(lambda: all(_subject_seen(server, renewed) for _ in range(6)), timeout=20,
               message='every worker to serve the new certificate')
    connection.request('GET', '/')  # opened before the reload: it goes on, on the old certificate
    assert connection.getresponse().status == 200
    connection.close()
    live.write_text('not a certificate\n')
    server.signal(signal.SIGHUP)
    server.wait_for_log(f"SIGHUP: the configuration is not valid, keeping the running one: certfile: '{live}'")
    assert get(server, renewed)[0] == 200


@pytest.mark.parametrize('options, message', [
    ('keyfile = {pki[ca]}\n', 'keyfile: '),
    ('ca_certs = {pki[server]}\ncert_reqs = required\nkeyfile = {pki[client_key]}\n',
     'does not match the certificate'),
    ('tls_minimum_version = TLSv1.1\n', 'tls_minimum_version: TLSv1.1 is not accepted'),
    ('cert_reqs = required\n', 'cert_reqs: required needs ca_certs'),
    ('ciphers = NOTHING-AT-ALL\n', 'ciphers: OpenSSL selects no cipher'),
    ('ciphers = ALL:COMPLEMENTOFALL:@SECLEVEL=0\n', 'selects suites without server authentication or encryption'),
    ('ciphers = aNULL\n', 'add :!aNULL:!eNULL'),
    ('ca_certs = {pki[rogue_ca]}\nhealth_check = /\n', 'health_check: the server refuses its own certificate'),
])
def test_bad_tls_files_are_exit_2_with_one_line(servers, ini, pki, options, message, zookeeper, zk,
                                                 zk_path):
    config = ini(f'certfile = {pki["server"]}\nzookeeper = {zookeeper.hosts}\npath = {zk_path}\n'
                 + options.format(pki=pki))
    server = servers(config)
    assert server.wait(timeout=30) == 2
    lines = server.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('zkprefork: error: ') and message in lines[0], lines
    assert not zk.exists(zk_path) or zk.get_children(zk_path) == []


@pytest.mark.parametrize('node_format', ['zk', 'serverset', 'curator'])
def test_each_node_format_says_https(tls_server, pki, zookeeper, zk, zk_path, node_format):
    server = tls_server(f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nnode_format = {node_format}\n')
    wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    [name] = zk.get_children(zk_path)
    value = node_data(zk, f'{zk_path}/{name}')
    if node_format == 'zk':
        assert value['scheme'] == 'https'
    elif node_format == 'serverset':
        assert value['additionalEndpoints']['https'] == value['serviceEndpoint']
        assert value['serviceEndpoint']['port'] == server.port
    else:
        raw, _ = zk.get(f'{zk_path}/{name}')
        instance = read_curator_instance(zk_path.rpartition('/')[2], name, raw)
        assert (instance['port'], instance['sslPort']) == (None, server.port)
        parts = instance['uriSpec']['parts']
        variables = {'scheme': 'https', 'address': instance['address'], 'ssl-port': instance['sslPort']}
        assert ''.join(str(variables[p['value']]) if p['variable'] else p['value'] for p in parts) == (
            f'https://127.0.0.1:{server.port}')


def test_status_and_metrics_show_the_certificate_and_handshakes(tls_server, pki):
    server = tls_server(f'monitor_server = 127.0.0.1:0\nca_certs = {pki["ca"]}\n')
    monitor = monitor_of(server)
    assert get(server, pki, cert='client')[0] == 200
    assert handshake_error(server, pki) is not None  # no client certificate
    with socket.create_connection(('127.0.0.1', server.port), timeout=10) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        _read_until_closed(sock)

    def counted():
        found = json.loads(ask(monitor, b'status\n'))['tls']
        failed = found['handshakes']['failed']
        return found if failed['http_request'] and failed['certificate'] else None
    found = wait_until(counted, message='the failed handshakes counted')
    assert found['certificate']['subject'] == 'CN=server'
    assert found['certificate']['issuer'] == 'CN=test CA'
    assert found['handshakes']['completed'] >= 1 and found['cert_reqs'] == 'required'
    metrics = ask(monitor, b'metrics\n')
    expiry = 'zkprefork_tls_certificate_expiry_timestamp_seconds{subject="CN=server"} '
    assert float(metrics.split(expiry)[1].split()[0]) == found['certificate']['not_after']
    assert 'zkprefork_tls_handshake_failures_total{reason="http_request"} 1.0' in metrics
    assert 'zkprefork_tls_handshakes_total ' in metrics


@pytest.mark.skipif(not (shutil.which('openssl') and shutil.which('curl')), reason='needs openssl and curl')
def test_the_readme_example(tmp_path):
    from support import free_port
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.rst')).read()
    block = readme.split('    # tls-example\n')[1].split('\n\n')[0]
    script = '\n'.join(line[4:] for line in block.splitlines())
    env = dict(os.environ, PORT=str(free_port()))
    bin_dir = os.path.dirname(shutil.which('zkprefork') or sys.executable)
    env['PATH'] = bin_dir + os.pathsep + env['PATH']
    shell = subprocess.Popen(['bash', '-e', '-c', script], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = shell.communicate(timeout=60)
    finally:
        try:
            os.killpg(shell.pid, signal.SIGKILL)  # the servers too, if the script did not stop them
        except ProcessLookupError:
            pass
        shell.wait()
    assert shell.returncode == 0, err
    assert out.count('Hello from zkprefork') == 2, out
    assert out.strip().endswith('refused without a certificate'), out
