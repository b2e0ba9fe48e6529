"""The health check over TLS, against a real ZooKeeper and real zkprefork
processes serving HTTPS and mutual TLS: the checker speaks TLS, presents a
client certificate when the server asks for one (its own certificate by
default, or health_check_certfile), and reads that certificate again on
SIGHUP; a certificate the server would refuse is exit 2 at start."""
import json
import os
import shutil
import signal
import socket
import ssl
import threading

import pytest

from support import make_tls_files, wait_until
from zkprefork import tls
from zkprefork.errors import ConfigError
from zkprefork.registrar import healthcheck
from zkprefork.registrar.protocol import RegistrarConfig
from zkprefork.settings import make_settings

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
INTERVAL, RISE, FALL = 0.5, 2, 3
HEALTH = (f'host = 127.0.0.1\nhealth_check = /healthz\nhealth_check_interval = {INTERVAL}\n'
          f'health_check_rise = {RISE}\nhealth_check_fall = {FALL}\n')

# /healthz passes only for a client whose certificate the server verified,
# and writes down, one JSON line each, the certificate it saw.
CLIENT_CERT_APP = '''\
import json
import os


def factory(global_conf, **local):
    seen = os.environ['SEEN_FILE']

    def app(environ, start_response):
        verified = environ.get('SSL_CLIENT_VERIFY') == 'SUCCESS'
        with open(seen, 'a') as file:
            file.write(json.dumps({'verify': environ.get('SSL_CLIENT_VERIFY'),
                                   'dn': environ.get('SSL_CLIENT_S_DN'),
                                   'cert': environ.get('SSL_CLIENT_CERT')}) + '\\n')
        start_response('200 OK' if verified else '403 Forbidden', [('Content-Length', '0')])
        return [b'']
    return app
'''


@pytest.fixture
def zk_options(zookeeper, zk_path):
    return f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\n'


def _pythonpath(*directories):
    return os.pathsep.join(filter(None, [*map(str, directories), os.environ.get('PYTHONPATH')]))


def _node(zk_path, server):
    return f'{zk_path}/127.0.0.1:{server.port}'


def test_an_https_health_check_registers_and_a_500_over_tls_unregisters(
        servers, ini, zk, zk_options, zk_path, tls_files, tmp_path):
    flag = tmp_path / 'unhealthy'
    config = ini(f'{zk_options}{HEALTH}certfile = {tls_files["server"]}\n', app='call:healthapp:factory')
    server = servers(config, env={'PYTHONPATH': _pythonpath(TESTS_DIR), 'HEALTHAPP_FLAG': str(flag)})
    server.wait_serving()
    node = _node(zk_path, server)
    wait_until(lambda: zk.exists(node), timeout=RISE * INTERVAL + 10, message='the node')
    flag.write_text('')
    wait_until(lambda: not zk.exists(node), timeout=FALL * INTERVAL + 10, message='the node to go')
    log = server.log()
    assert f'GET /healthz from 127.0.0.1:{server.port} over TLS every 0.5 s' in log
    assert 'health check /healthz: UP (2 passed in a row, HTTP 200): registering' in log
    assert 'health check /healthz: DOWN (3 failed in a row, last: HTTP 500): unregistering' in log


def _seen(path):
    """The client certificates /healthz saw, as decoded JSON lines."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _der(pem_text):
    return ssl.PEM_cert_to_DER_cert(pem_text.strip())


def _first_certificate(path):
    text = open(path).read()
    start = text.index('-----BEGIN CERTIFICATE-----')
    end = text.index('-----END CERTIFICATE-----') + len('-----END CERTIFICATE-----')
    return _der(text[start:end])


def _client_cert_server(servers, ini, tmp_path, options):
    (tmp_path / 'certapp.py').write_text(CLIENT_CERT_APP)
    seen = tmp_path / 'seen.jsonl'
    config = ini(options, app='call:certapp:factory')
    server = servers(config, env={'PYTHONPATH': _pythonpath(tmp_path), 'SEEN_FILE': str(seen)})
    return server.wait_serving(), seen


@pytest.mark.parametrize('cert_reqs, own_option, subject', [
    ('required', '', 'CN=server'),  # the server's own certificate, by default
    ('required', 'health_check_certfile = {client_cert}\nhealth_check_keyfile = {client_key}\n',
     'CN=client'),
    ('optional', '', 'CN=server'),
])
def test_mutual_tls_the_checker_authenticates(servers, ini, zk, zk_options, zk_path, tls_files, tmp_path,
                                               cert_reqs, own_option, subject):
    options = (f'{zk_options}{HEALTH}certfile = {tls_files["server"]}\nca_certs = {tls_files["ca"]}\n'
               f'cert_reqs = {cert_reqs}\n' + own_option.format(**tls_files))
    server, seen = _client_cert_server(servers, ini, tmp_path, options)
    wait_until(lambda: zk.exists(_node(zk_path, server)), timeout=RISE * INTERVAL + 10, message='the node')
    checks = _seen(seen)
    assert checks and all(check['verify'] == 'SUCCESS' and check['dn'] == subject for check in checks)


def _write_identity(directory, files):
    """Copy a client certificate and its key to `directory`, as one rotates them in place."""
    shutil.copy(files['client_cert'], directory / 'check.crt')
    shutil.copy(files['client_key'], directory / 'check.key')


def test_the_checkers_certificate_is_read_again_on_hup(servers, ini, zk, zk_options, zk_path, tls_files,
                                                      tmp_path):
    """Rotated in place, the checker's certificate is used from the reload
    on (not before: it follows SIGHUP, as the server's own do); a bad one
    halts the reload and the checker keeps the one it has."""
    (tmp_path / 'renewed').mkdir()
    renewed = make_tls_files(str(tmp_path / 'renewed'))  # another CA's client certificate
    bundle = tmp_path / 'cas.pem'
    bundle.write_text(open(tls_files['ca']).read() + open(renewed['ca']).read())
    live = tmp_path / 'live'
    live.mkdir()
    _write_identity(live, tls_files)
    options = (f'{zk_options}{HEALTH}certfile = {tls_files["server"]}\nca_certs = {bundle}\n'
               f'health_check_certfile = {live / "check.crt"}\nhealth_check_keyfile = {live / "check.key"}\n')
    server, seen = _client_cert_server(servers, ini, tmp_path, options)
    wait_until(lambda: zk.exists(_node(zk_path, server)), timeout=RISE * INTERVAL + 10, message='the node')

    def last_seen():
        return _der(_seen(seen)[-1]['cert'])
    assert last_seen() == _first_certificate(tls_files['client_cert'])
    _write_identity(live, renewed)
    checks = len(_seen(seen))
    wait_until(lambda: len(_seen(seen)) >= checks + 3, message='three more checks')
    assert last_seen() == _first_certificate(tls_files['client_cert'])  # not before the reload
    server.signal(signal.SIGHUP)
    wait_until(lambda: last_seen() == _first_certificate(renewed['client_cert']), timeout=20,
               message='the checker to present the renewed certificate')
    (live / 'check.crt').write_text('not a certificate\n')
    server.signal(signal.SIGHUP)
    server.wait_for_log("SIGHUP: the configuration is not valid, keeping the running one: "
                        f"health_check_certfile: '{live / 'check.crt'}': ")
    checks = len(_seen(seen))
    wait_until(lambda: len(_seen(seen)) >= checks + 3, message='three more checks')
    assert last_seen() == _first_certificate(renewed['client_cert'])
    assert zk.exists(_node(zk_path, server))


def test_a_checker_certificate_the_server_refuses_is_exit_2(servers, ini, zk, zk_options, zk_path,
                                                            tls_files):
    config = ini(f'{zk_options}{HEALTH}certfile = {tls_files["server"]}\nca_certs = {tls_files["ca"]}\n'
                 f'health_check_certfile = {tls_files["rogue_client_cert"]}\n'
                 f'health_check_keyfile = {tls_files["rogue_client_key"]}\n')
    server = servers(config)
    assert server.wait(timeout=30) == 2
    lines = server.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == (f"zkprefork: error: health_check_certfile: {tls_files['rogue_client_cert']!r}: "
                        f"the server refuses it as a client certificate (unable to get local issuer "
                        f"certificate, ca_certs {tls_files['ca']!r})")
    assert not zk.exists(zk_path) or zk.get_children(zk_path) == []


def _settings(tls_files, **options):
    base = {'zookeeper': '127.0.0.1:2181', 'path': '/svc', 'host': '127.0.0.1',
            'health_check': '/healthz', 'certfile': tls_files['server']}
    return make_settings({**base, **options})


def test_what_the_checker_presents_is_checked_at_start(tls_files):
    # The server's own certificate, when its ca_certs do not sign it.
    with pytest.raises(ConfigError, match=r"^health_check: the server refuses its own certificate "
                                          r".* \(unable to get local issuer certificate, ca_certs .*\): "
                                          r"give one in health_check_certfile$"):
        _settings(tls_files, ca_certs=tls_files['rogue_ca'])
    with pytest.raises(ConfigError, match=r'^health_check_certfile: the server asks no client certificate'):
        _settings(tls_files, health_check_certfile=tls_files['client_cert'])
    with pytest.raises(ConfigError, match=r'^health_check_keyfile: needs health_check_certfile'):
        _settings(tls_files, ca_certs=tls_files['ca'], health_check_keyfile=tls_files['client_key'])
    with pytest.raises(ConfigError, match=r'^health_check_certfile: TLS needs certfile'):
        make_settings({'zookeeper': '127.0.0.1:2181', 'path': '/svc', 'health_check': '/healthz',
                       'health_check_certfile': tls_files['client_cert']})
    with pytest.raises(ConfigError, match=r"^health_check_keyfile: .*: the key does not match the "
                                          r"certificate \(health_check_certfile\)$"):
        _settings(tls_files, ca_certs=tls_files['ca'], health_check_certfile=tls_files['client_cert'],
                  health_check_keyfile=tls_files['rogue_client_key'])
    settings = _settings(tls_files, ca_certs=tls_files['ca'])
    assert settings.health_check_identity == (tls_files['server'], None, None)
    assert _settings(tls_files).health_check_identity is None


def test_probe_over_tls_names_a_refused_handshake(tls_files):
    """A plain HTTP server is not spoken to in plain text: the handshake fails, and says so."""
    listener = socket.create_server(('127.0.0.1', 0))
    port = listener.getsockname()[1]

    def answer_in_plain_text():
        connection, _ = listener.accept()
        with connection:
            connection.recv(1024)
            connection.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n')
    thread = threading.Thread(target=answer_in_plain_text, daemon=True)
    thread.start()
    try:
        passed, detail, _ = healthcheck.probe('127.0.0.1', port, '/healthz', 5.0, context=tls.client_context())
    finally:
        thread.join(5)
        listener.close()
    assert passed is False and detail.startswith('SSLError: ') and '\n' not in detail


def _server_auth_only(directory):
    """A CA and a server certificate (key and chain in one file) whose
    extended key usage is serverAuth only, as public CAs issue them now:
    (ca path, server path)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    now = datetime.datetime.now(datetime.timezone.utc)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
    names = [x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) for cn in ('public CA', 'server')]
    made = []
    for index, (ca, extra) in enumerate(((True, None), (False, ExtendedKeyUsageOID.SERVER_AUTH))):
        builder = (x509.CertificateBuilder().subject_name(names[index]).issuer_name(names[0])
                   .public_key(keys[index].public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if extra:
            builder = builder.add_extension(x509.ExtendedKeyUsage([extra]), critical=False)
        made.append(builder.sign(keys[0], hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    ca_path, server_path = directory / 'public_ca.pem', directory / 'server_auth_only.pem'
    ca_path.write_bytes(made[0])
    key = keys[1].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    server_path.write_bytes(key + made[1])
    return str(ca_path), str(server_path)


def test_a_server_certificate_not_valid_for_clients_needs_health_check_certfile(tls_files, tmp_path):
    ca, server = _server_auth_only(tmp_path)
    bundle = tmp_path / 'cas.pem'
    bundle.write_text(open(ca).read() + open(tls_files['ca']).read())
    with pytest.raises(ConfigError, match=r'^health_check: the server refuses its own certificate .*'
                                          r'\(unsuitable certificate purpose, .*health_check_certfile$'):
        _settings(tls_files, certfile=server, ca_certs=str(bundle))
    settings = _settings(tls_files, certfile=server, ca_certs=str(bundle),
                         health_check_certfile=tls_files['client_cert'],
                         health_check_keyfile=tls_files['client_key'])
    assert settings.health_check_identity == (tls_files['client_cert'], tls_files['client_key'], None)


def test_an_encrypted_checker_key_is_read_with_its_password_file(tls_files, tmp_path):
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(open(tls_files['client_key'], 'rb').read(), None)
    encrypted = tmp_path / 'client.key'
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b'sesame')))
    password = tmp_path / 'password'
    password.write_text('sesame\n')
    options = {'ca_certs': tls_files['ca'], 'health_check_certfile': tls_files['client_cert'],
               'health_check_keyfile': str(encrypted)}
    with pytest.raises(ConfigError, match=r'^health_check_keyfile: .* is encrypted: give its password in '
                                          r'health_check_keyfile_password_file$'):
        _settings(tls_files, **options)
    settings = _settings(tls_files, **options, health_check_keyfile_password_file=str(password))
    config = RegistrarConfig.from_settings(settings)
    assert (config.health.tls, config.health.certfile, config.health.keyfile,
            config.health.keyfile_password_file) == (True, tls_files['client_cert'], str(encrypted),
                                                     str(password))
    assert RegistrarConfig.read(config.line()) == config
    password.write_text('wrong\n')
    with pytest.raises(ConfigError, match=r'^health_check_keyfile: .*wrong password'):
        tls.client_context(*settings.health_check_identity)
