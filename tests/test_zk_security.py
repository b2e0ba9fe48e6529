"""Credentials, ACLs, SASL, TLS, and secrets kept out of the logs: the
pieces on their own, then against real ZooKeepers configured for each."""
import json
import logging
import re
import secrets
import signal
import tempfile
import time

import psutil
import pytest
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

from support import (ZOOKEEPER_TLS_CLASSPATH, free_port, registrar_of, secure_port,
                     tls_zookeeper_config, wait_until, write_ini)
from test_operations import ask
from zkprefork.registrar import security as zksecurity, session as zksession
from zkprefork.master.registrar_link import RegistrarLink
from zkprefork.registrar.protocol import CredentialsSource, RegistrarConfig, TLSOptions
from zkprefork.settings import Settings

PASSWORD = 'pw-' + secrets.token_hex(8)


# -- the pieces --------------------------------------------------------------

def test_redact_secrets_and_session_passwords():
    secret = ['app:' + PASSWORD, PASSWORD]
    assert zksecurity.redact(f"Auth(auth_type=0, scheme='digest', auth='app:{PASSWORD}')", secret) == \
        "Auth(auth_type=0, scheme='digest', auth='<redacted>')"
    assert zksecurity.redact(f'password {PASSWORD}!', secret) == 'password <redacted>!'
    assert zksecurity.redact(r"Connect(session_id=5, passwd=b'\x00\x12\'q', read_only=None)", []) == \
        'Connect(session_id=5, passwd=<redacted>, read_only=None)'
    assert zksecurity.redact('session_id: 72 session_passwd: 0a1b2c3d\n', []) == \
        'session_id: 72 session_passwd: <redacted>\n'


def test_log_records_are_cleaned_as_they_are_made(caplog):
    factory = logging.getLogRecordFactory()
    try:
        zksecurity.redact_logs(zksecurity.Credentials('app', PASSWORD, 'digest'))
        with caplog.at_level(logging.DEBUG):
            logging.getLogger('kazoo.client').debug('Sending request(xid=%s): %s', 1,
                                                    f"Auth(auth='app:{PASSWORD}')")
            try:
                raise ValueError(PASSWORD)
            except ValueError:
                logging.getLogger('kazoo.client').exception('failed')
    finally:
        logging.setLogRecordFactory(factory)
    assert PASSWORD not in caplog.text
    assert "Auth(auth='<redacted>')" in caplog.text and 'ValueError: <redacted>' in caplog.text


def test_credentials_from_a_file_or_the_environment(tmp_path, monkeypatch):
    path = tmp_path / 'credentials'
    path.write_text(f'app:{PASSWORD}\n')
    from_file = zksecurity.read_credentials(CredentialsSource(str(path), None, 'digest'))
    assert from_file == ('app', PASSWORD, 'digest')
    assert PASSWORD not in repr(from_file)
    monkeypatch.setenv('ZKPF_TEST_CREDENTIALS', f'svc:{PASSWORD}')
    from_env = zksecurity.read_credentials(CredentialsSource(None, 'ZKPF_TEST_CREDENTIALS', 'sasl'))
    assert from_env == ('svc', PASSWORD, 'sasl')
    assert zksecurity.read_credentials(None) is None
    monkeypatch.setenv('ZKPF_TEST_CREDENTIALS', PASSWORD)
    with pytest.raises(ValueError, match='ZKPF_TEST_CREDENTIALS does not hold credentials') as raised:
        zksecurity.read_credentials(CredentialsSource(None, 'ZKPF_TEST_CREDENTIALS', 'digest'))
    assert PASSWORD not in str(raised.value)


def test_acls_and_client_options():
    assert zksecurity.acls(None)[1][0].perms == 1  # world: read only, as zc.zkzopeserver
    digest = zksecurity.Credentials('app', PASSWORD, 'digest')
    path_acl, node_acl = zksecurity.acls(digest)
    assert path_acl == node_acl == [zksecurity.make_acl('world', 'anyone', read=True),
                                    make_digest_acl('app', PASSWORD, all=True)]
    assert zksecurity.client_options(None, digest) == {'auth_data': [('digest', f'app:{PASSWORD}')]}
    sasl = zksecurity.client_options(TLSOptions('/ca', None, None, True), digest._replace(scheme='sasl'))
    assert sasl['sasl_options'] == {'mechanism': 'DIGEST-MD5', 'username': 'app', 'password': PASSWORD}
    assert sasl['use_ssl'] and sasl['verify_certs'] and sasl['check_hostname']
    assert zksecurity.open_to_anyone(OPEN_ACL_UNSAFE) and not zksecurity.open_to_anyone(path_acl)


def test_sasl_without_its_package_is_named(monkeypatch):
    monkeypatch.setattr(zksecurity.importlib.util, 'find_spec', lambda name: None)
    sasl = zksecurity.Credentials('app', PASSWORD, 'sasl')
    assert "pip install 'zkprefork[sasl]'" in zksecurity.missing_support(sasl)
    assert zksecurity.missing_support(sasl._replace(scheme='digest')) is None


def test_the_registrar_is_told_where_secrets_are_not_what_they_are():
    link = RegistrarLink(Settings(zookeeper='127.0.0.1:2181', path='/svc',
                                  zookeeper_credentials_env='ZKPF_TEST_CREDENTIALS',
                                  zookeeper_ca_file='/ca.pem', properties=(('dc', 'east'),)))
    config = link._config()
    assert config.credentials == CredentialsSource(None, 'ZKPF_TEST_CREDENTIALS', 'digest')
    assert config.tls.check_hostname is True  # Settings' default, carried over
    assert config.properties == (('dc', 'east'),)
    assert RegistrarConfig.read(config.line()) == config


# -- against real ZooKeepers ---------------------------------------------------

ALL_LOGS = '''\
loggers =
  <logger>
    level all
    <logfile>
      path STDERR
      format $$(asctime)s $$(levelname)s $$(name)s $$(message)s
    </logfile>
  </logger>
'''


def start(servers, tmp_path, hosts, path, options='', env=None):
    """Start a server with an ini file of its own (tests here run several at once)."""
    directory = tempfile.mkdtemp(dir=tmp_path)
    config = write_ini(directory, f'zookeeper = {hosts}\npath = {path}\nhost = 127.0.0.1\n' + options)
    return servers(config, env=env)


def node_of(server, path):
    return f'{path}/127.0.0.1:{server.port}'


def error_lines(server, text):
    return [line for line in server.log().splitlines() if 'ERROR' in line and text in line]


def assert_reported_once(server, text, quiet_for=1.5):
    """One error line, and no more attempts after it."""
    server.wait_for_log(re.escape(text))
    connects = server.log().count('Connecting to')
    time.sleep(quiet_for)  # the scenario: no further attempt may come meanwhile
    assert len(error_lines(server, text)) == 1, server.log()
    assert server.log().count('Connecting to') == connects, 'still retrying'
    assert 'not retrying before the next reload or restart' in error_lines(server, text)[0]


def test_digest_acls_are_enforced_and_no_secret_reaches_any_log(servers, tmp_path, zookeeper, zk, zk_path,
                                                                kazoo_client):
    server = start(servers, tmp_path, zookeeper.hosts, zk_path,
                   'zookeeper_credentials_env = ZKPF_TEST_CREDENTIALS\n' + ALL_LOGS,
                   env={'ZKPF_TEST_CREDENTIALS': f'app:{PASSWORD}'}).wait_serving()
    node = node_of(server, zk_path)
    wait_until(lambda: zk.exists(node), message='the node')
    ours = make_digest_acl('app', PASSWORD, all=True)
    readable = zksecurity.make_acl('world', 'anyone', read=True)
    # ZooKeeper shows digest ids in full only to those who may administer the node.
    admin = kazoo_client(zookeeper.hosts, auth_data=[('digest', f'app:{PASSWORD}')])
    assert admin.get_acls(zk_path)[0] == [readable, ours]
    assert admin.get_acls(node)[0] == [readable, ours]

    anonymous = kazoo_client(zookeeper.hosts)
    assert json.loads(anonymous.get(node)[0])['pid'] == server.pid  # everyone reads
    with pytest.raises(NoAuthError):
        anonymous.delete(node)
    with pytest.raises(NoAuthError):
        anonymous.create(f'{zk_path}/127.0.0.1:1', b'{"pid":1}', ephemeral=True)
    with pytest.raises(NoAuthError):
        anonymous.set(node, b'{}')

    # With write access of its own, the registrar updates data in place.
    created = zk.exists(node).czxid
    server.signal(signal.SIGTTIN)
    wait_until(lambda: json.loads(zk.get(node)[0])['workers'] == 2, message='the update')
    assert zk.exists(node).czxid == created

    log = server.log()
    assert "scheme='digest', auth='<redacted>'" in log  # kazoo's DEBUG line, cleaned
    assert 'session_passwd: <redacted>' in log  # and its level-5 one
    assert PASSWORD not in log
    for process in [psutil.Process(server.pid), registrar_of(server)]:
        assert PASSWORD not in ' '.join(process.cmdline())
    assert PASSWORD not in zk.get(node)[0].decode()


def test_a_wrong_password_is_named_once_and_a_reload_tries_again(servers, tmp_path, zookeeper, zk_path,
                                                                 kazoo_client):
    owner = kazoo_client(zookeeper.hosts, auth_data=[('digest', f'app:{PASSWORD}')])
    owner.create(zk_path, acl=zksecurity.acls(zksecurity.Credentials('app', PASSWORD, 'digest'))[0],
                 makepath=True)
    credentials = tmp_path / 'credentials'
    credentials.write_text('app:not-the-password\n')
    server = start(servers, tmp_path, zookeeper.hosts, zk_path,
                   f'zookeeper_credentials_file = {credentials}\n').wait_serving()
    assert_reported_once(server, "ZooKeeper refused digest user 'app' to register "
                                 f'{node_of(server, zk_path)} (NoAuth')
    assert owner.get_children(zk_path) == []
    assert server.request('/')[0] == 200

    # The owner of the path lets that identity in; a reload registers.
    owner.set_acls(zk_path, owner.get_acls(zk_path)[0] + [make_digest_acl('app', 'not-the-password',
                                                                          create=True)])
    server.signal(signal.SIGHUP)
    wait_until(lambda: owner.get_children(zk_path), message='registration after the reload')


def test_unreadable_credentials_are_named_without_a_restart_loop(servers, tmp_path, zookeeper, zk_path):
    credentials = tmp_path / 'credentials'
    credentials.write_text(f'app:{PASSWORD}\n')
    server = start(servers, tmp_path, zookeeper.hosts, zk_path,
                   f'zookeeper_credentials_file = {credentials}\n').wait_serving()
    # Rewritten in place, as the master's open fd of it sees it (a file
    # deleted or replaced would change nothing: test_registrar_liveness.py).
    credentials.write_text(PASSWORD + '\n')
    old = registrar_of(server)
    old.kill()  # the master starts another, which cannot read the file
    server.wait_for_log('cannot read the ZooKeeper credentials: .* not registering')
    time.sleep(1.0)  # the scenario: no further attempt may come meanwhile
    assert server.log().count('cannot read the ZooKeeper credentials') == 1
    assert registrar_of(server).pid != old.pid
    assert server.request('/')[0] == 200
    assert PASSWORD not in server.log()


def test_a_malformed_secret_is_named_by_the_registrar_alone(servers, tmp_path, zookeeper, zk, zk_path):
    credentials = tmp_path / 'credentials'
    credentials.write_text(PASSWORD + '\n')  # no user: not of the form user:password
    server = start(servers, tmp_path, zookeeper.hosts, zk_path,
                   f'zookeeper_credentials_file = {credentials}\n').wait_serving()
    server.wait_for_log(re.escape(f'cannot read the ZooKeeper credentials: {credentials} does not hold '
                                  'credentials of the form user:password; not registering'))
    assert server.request('/')[0] == 200
    time.sleep(0.5)
    assert server.log().count('cannot read the ZooKeeper credentials') == 1
    assert zk.exists(zk_path) is None
    assert PASSWORD not in server.log()


def test_sasl_digest_md5(servers, tmp_path, own_zookeeper, kazoo_client):
    pytest.importorskip('puresasl', reason='SASL needs the pure-sasl package')
    jaas = tmp_path / 'jaas.conf'
    jaas.write_text('Server {\n  org.apache.zookeeper.server.auth.DigestLoginModule required\n'
                    f'  user_app="{PASSWORD}";\n}};\n')
    zookeeper = own_zookeeper(
        extra='authProvider.1=org.apache.zookeeper.server.auth.SASLAuthenticationProvider\n',
        jvm_options=[f'-Djava.security.auth.login.config={jaas}'])
    right, wrong = tmp_path / 'right', tmp_path / 'wrong'
    right.write_text(f'app:{PASSWORD}')
    wrong.write_text('app:guess')
    path = '/sasl/providers'
    good = start(servers, tmp_path, zookeeper.hosts, path, f'zookeeper_auth = sasl\n'
                 f'zookeeper_credentials_file = {right}\n')
    bad = start(servers, tmp_path, zookeeper.hosts, path, f'zookeeper_auth = sasl\n'
                f'zookeeper_credentials_file = {wrong}\n')
    good.wait_serving()
    bad.wait_serving()
    anonymous = kazoo_client(zookeeper.hosts)
    node = node_of(good, path)
    wait_until(lambda: anonymous.exists(node), message='the node')
    assert anonymous.get_acls(node)[0][1] == zksecurity.make_acl('sasl', 'app', all=True)
    with pytest.raises(NoAuthError):
        anonymous.delete(node)
    rejected = "ZooKeeper rejected the credentials of SASL user 'app' (authentication failed)"
    assert_reported_once(bad, rejected)
    assert anonymous.get_children(path) == [node.rpartition('/')[2]]
    bad.signal(signal.SIGHUP)  # a reload tries again, and fails the same way
    wait_until(lambda: len(error_lines(bad, rejected)) == 2, message='a second attempt')


@pytest.fixture
def tls_zookeeper(own_zookeeper, tls_files):
    def make(key_store='server'):
        return own_zookeeper(extra=tls_zookeeper_config(tls_files, key_store),
                             classpath=ZOOKEEPER_TLS_CLASSPATH)
    return make


def tls_options(files, ca='ca', client='client'):
    return (f"zookeeper_ca_file = {files[ca]}\nzookeeper_cert_file = {files[client + '_cert']}\n"
            f"zookeeper_key_file = {files[client + '_key']}\n")


def test_tls(servers, tmp_path, tls_zookeeper, tls_files, kazoo_client):
    zookeeper = tls_zookeeper()
    tls_hosts = f'127.0.0.1:{secure_port(zookeeper)}'
    path = '/tls/providers'
    good = start(servers, tmp_path, tls_hosts, path, tls_options(tls_files))  # hostname checked
    untrusted = start(servers, tmp_path, tls_hosts, path, tls_options(tls_files, ca='rogue_ca'))
    refused = start(servers, tmp_path, tls_hosts, path, tls_options(tls_files, client='rogue_client'))
    plain = start(servers, tmp_path, zookeeper.hosts, path, tls_options(tls_files))
    for server in (good, untrusted, refused, plain):
        server.wait_serving()
    zk = kazoo_client(zookeeper.hosts)
    wait_until(lambda: zk.exists(node_of(good, path)), message='the node registered over TLS')
    assert_reported_once(untrusted, f'TLS handshake with ZooKeeper failed: {tls_hosts}: the server '
                                    'certificate is not accepted: unable to get local issuer certificate')
    assert_reported_once(refused, f'TLS handshake with ZooKeeper failed: {tls_hosts}: '
                                  'the server refused our client certificate', quiet_for=0)
    assert_reported_once(plain, f'TLS handshake with ZooKeeper failed: {zookeeper.hosts}: '
                                'no TLS on that port', quiet_for=0)
    assert zk.get_children(path) == [node_of(good, path).rpartition('/')[2]]


def test_tls_hostname_checking(servers, tmp_path, tls_zookeeper, tls_files, kazoo_client):
    zookeeper = tls_zookeeper('wrong_name_server')  # a certificate for zookeeper.invalid
    tls_hosts = f'127.0.0.1:{secure_port(zookeeper)}'
    path = '/tls-hostname/providers'
    checked = start(servers, tmp_path, tls_hosts, path, tls_options(tls_files))
    unchecked = start(servers, tmp_path, tls_hosts, path,
                      tls_options(tls_files) + 'zookeeper_check_hostname = false\n')
    checked.wait_serving()
    unchecked.wait_serving()
    zk = kazoo_client(zookeeper.hosts)
    wait_until(lambda: zk.exists(node_of(unchecked, path)), message='the unchecked node')
    assert_reported_once(checked, 'the server certificate is not accepted: IP address mismatch')
    assert zk.get_children(path) == [node_of(unchecked, path).rpartition('/')[2]]


def registration_state(monitor_port):
    return json.loads(ask(('127.0.0.1', monitor_port), b'status\n'))['registration']['state']


def test_a_ca_file_that_stops_loading_is_one_error_and_state_failed(servers, tmp_path, tls_files):
    """Settings loaded it at the start; replaced later by something that is
    not PEM, the registrar's TLS check says so, and so does a registrar
    started anew: one line each, state failed, no thread traceback."""
    ca_file = tmp_path / 'ca.pem'
    with open(tls_files['ca'], 'rb') as good:
        ca_file.write_bytes(good.read())
    monitor_port = free_port()
    # Nothing listens there: no handshake fails, the check keeps looking.
    server = start(servers, tmp_path, f'127.0.0.1:{free_port()}', '/tls-files/providers',
                   f'zookeeper_ca_file = {ca_file}\nmonitor_server = 127.0.0.1:{monitor_port}\n').wait_serving()
    ca_file.write_text('myhost\n')  # such as /etc/hostname
    text = f'zookeeper_ca_file: {str(ca_file)!r}: no CA certificate loads (NO_CERTIFICATE_OR_CRL_FOUND)'
    checks = zksession.TLS_CHECK_AFTER + zksession.TLS_CHECK_EVERY
    server.wait_for_log(re.escape(text), timeout=checks + 5)
    wait_until(lambda: registration_state(monitor_port) == 'failed', message='state failed')
    old = registrar_of(server)
    old.kill()  # the master starts another: it reads the file anew
    wait_until(lambda: len(error_lines(server, text)) == 2, timeout=10, message='the new registrar\'s error')
    assert registrar_of(server).pid != old.pid
    wait_until(lambda: registration_state(monitor_port) == 'failed', message='state failed again')
    assert all('not retrying before the next reload or restart' in line for line in error_lines(server, text))
    assert 'Traceback' not in server.log() and 'Exception in thread' not in server.log(), server.log()
    assert server.request('/')[0] == 200


def test_a_server_that_refuses_ephemeral_nodes(servers, tmp_path, ensemble):
    [member] = ensemble(1, extra='localSessionsEnabled=true\nlocalSessionsUpgradingEnabled=false\n')
    server = start(servers, tmp_path, member.hosts, '/local/providers').wait_serving()
    assert_reported_once(server, 'ZooKeeper refuses ephemeral nodes to this session: cannot register '
                                 f'{node_of(server, "/local/providers")} (EphemeralOnLocalSession')


def test_the_masters_own_identity_is_never_shown(servers, tmp_path, zookeeper, zk, zk_path, kazoo_client):
    """Without credentials the master makes up a digest identity for its
    registrars: it writes the node, and appears in no log, command line,
    node data or monitor output."""
    monitor_port = free_port()
    server = start(servers, tmp_path, zookeeper.hosts, zk_path,
                   f'monitor_server = 127.0.0.1:{monitor_port}\n' + ALL_LOGS).wait_serving()
    node = node_of(server, zk_path)
    wait_until(lambda: zk.exists(node), message='the node')
    acl = zk.get_acls(node)[0]
    assert acl[0] == zksecurity.make_acl('world', 'anyone', read=True)
    assert acl[1].id.scheme == 'digest' and acl[1].perms == 31  # ALL, for the master's identity
    user = acl[1].id.id.partition(':')[0]
    assert user.startswith('zkprefork-')
    log = server.log()
    assert "scheme='digest', auth='<redacted>'" in log
    # Only the ACL's digest (a base64 SHA-1) follows the user name, never the password.
    shown = re.findall(re.escape(user) + r":([^'\s]*)", log)
    assert shown and all(re.fullmatch(r'[A-Za-z0-9+/]{27}=', text) for text in shown), set(shown)
    status = ask(('127.0.0.1', monitor_port), b'status\n')
    assert user not in status and 'password' not in status
    for process in [psutil.Process(server.pid), registrar_of(server)]:
        assert user not in ' '.join(process.cmdline())
    with pytest.raises(NoAuthError):
        kazoo_client(zookeeper.hosts).set(node, b'{}')
