"""Unit tests of zkprefork.settings: raw option strings in, checked Settings out."""
import dataclasses
import importlib.util
import logging
import os

import pytest
from kazoo.hosts import collect_hosts

from zkprefork.nodeformat import FORMATS
from zkprefork.settings import OPTIONS, RESTART_ONLY, ConfigError, Settings, make_settings


def rejected(option, value, **others):
    with pytest.raises(ConfigError) as caught:
        make_settings({option: value, **others})
    message = str(caught.value)
    assert message.startswith(f'{option}: '), message
    assert '\n' not in message, message
    return message


# -- defaults ----------------------------------------------------------------------------

def test_defaults_are_zc_zkzopeservers():
    settings = make_settings({})
    assert settings.host == ''
    assert settings.port == 0
    assert settings.threads == 1
    assert settings.workers == 1
    assert settings.graceful_timeout == 30
    # kazoo's (and so zc.zk's) default session timeout is 10 s; the option is in ms.
    assert settings.session_timeout == 10000
    assert settings.zookeeper is None and not settings.registers
    assert settings.path is None
    assert settings.monitor_server is None
    assert settings.loggers is None
    assert settings.zservertracelog is False
    assert settings.name is None
    assert settings.pidfile is None
    assert settings.app_name == 'main'
    assert settings == Settings()


def test_settings_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_settings({}).workers = 2


def test_fixed_values_are_passed_through():
    settings = make_settings({}, config_file='/etc/app.ini', app_name='other')
    assert settings.config_file == '/etc/app.ini'
    assert settings.app_name == 'other'


def test_none_means_not_given():
    assert make_settings({'workers': None, 'port': None}) == Settings()


def test_every_zc_zkzopeserver_option_is_known():
    zc_zkzopeserver = {'zookeeper', 'path', 'host', 'port', 'threads', 'session_timeout',
                       'monitor_server', 'loggers', 'zservertracelog', 'name'}
    assert zc_zkzopeserver | {'workers', 'graceful_timeout', 'pidfile'} <= set(OPTIONS)


# -- integers ---------------------------------------------------------------------------

def test_session_timeout_is_milliseconds():
    assert make_settings({'session_timeout': '4000'}).session_timeout == 4000


@pytest.mark.parametrize('option, value, expected', [
    ('workers', '1', 1), ('workers', ' 8 ', 8), ('workers', '1000', 1000),
    ('threads', '1', 1), ('threads', '10000', 10000),
    ('port', '0', 0), ('port', '8080', 8080), ('port', '65535', 65535),
    ('session_timeout', '1', 1), ('session_timeout', '600000', 600000),
    ('graceful_timeout', '0', 0.0), ('graceful_timeout', '2.5', 2.5),
    ('request_timeout', '0', 0.0), ('request_timeout', '30', 30.0),
])
def test_good_numbers(option, value, expected):
    assert getattr(make_settings({option: value}), option) == expected


@pytest.mark.parametrize('option, value', [
    ('workers', '0'), ('workers', '-1'), ('workers', '1001'), ('workers', 'two'), ('workers', '1.5'),
    ('workers', ''),
    ('threads', '0'), ('threads', '-1'), ('threads', '10001'), ('threads', 'x'),
    ('port', '-1'), ('port', '65536'), ('port', '70000'), ('port', 'http'),
    ('session_timeout', '0'), ('session_timeout', 'abc'), ('session_timeout', '10s'),
    ('graceful_timeout', '-1'), ('graceful_timeout', 'nan'), ('graceful_timeout', 'inf'),
    ('graceful_timeout', 'soon'), ('request_timeout', '-1'),
])
def test_bad_numbers(option, value):
    message = rejected(option, value)
    assert repr(value) in message


ZOOKEEPER = {'zookeeper': 'zk', 'path': '/svc'}  # what the health check options need


@pytest.mark.parametrize('option, limit', [
    ('boot_timeout', 'more than zero seconds'), ('keepalive', 'more than zero seconds'),
    ('request_read_timeout', 'more than zero seconds'), ('send_timeout', 'more than zero seconds'),
    ('health_check_interval', 'more than zero seconds'), ('health_check_timeout', 'more than zero seconds'),
    ('graceful_timeout', 'zero or more seconds'), ('timeout', 'zero or more seconds'),
    ('request_timeout', 'zero or more seconds'),
])
@pytest.mark.parametrize('value', ['-5', '0', 'inf', '-inf', 'nan'])
def test_a_duration_out_of_range_is_told_its_real_limit(option, limit, value):
    if value == '0' and limit.startswith('zero'):
        assert getattr(make_settings({option: value, **ZOOKEEPER}), option) == 0
        return
    message = rejected(option, value, **ZOOKEEPER)
    assert message.startswith(f'{option}: {value!r} ') and message.endswith(f'(must be {limit})'), message


# -- loggers --------------------------------------------------------------------------------

@pytest.mark.parametrize('value, expected', [
    ('info', 'INFO'), ('INFO', 'INFO'), ('Debug', 'DEBUG'), ('warning', 'WARNING'),
    (' error ', 'ERROR'), ('critical', 'CRITICAL'),
])
def test_level_names_in_any_case(value, expected):
    assert make_settings({'loggers': value}).loggers == expected
    assert isinstance(logging.getLevelName(expected), int)


@pytest.mark.parametrize('value', ['verbose', 'infoo', 'loud'])
def test_bad_level_name(value):
    assert repr(value) in rejected('loggers', value)


ZCONFIG_LOGGERS = '''
<logger>
  level INFO
  <logfile>
    path STDERR
    format $$(asctime)s $$(levelname)s $$(name)s $$(message)s
  </logfile>
</logger>
'''


def test_zconfig_logger_block_with_double_dollar_becomes_percent():
    loggers = make_settings({'loggers': ZCONFIG_LOGGERS}).loggers
    assert '$$(' not in loggers
    assert 'format %(asctime)s %(levelname)s %(name)s %(message)s' in loggers
    assert loggers.lstrip().startswith('<logger>')


def test_zconfig_logger_block_is_usable_by_zconfig():
    from zkprefork.settings import _parse_zconfig_loggers
    loggers = _parse_zconfig_loggers(make_settings({'loggers': ZCONFIG_LOGGERS}).loggers)
    assert len(loggers) == 1


@pytest.mark.parametrize('value', [
    '<logger>\n  level verbose\n</logger>',
    '<logger>\n  level INFO\n',
    '<nonsense>\n</nonsense>',
    '<logger>\n  level INFO\n  colour blue\n</logger>',
])
def test_bad_zconfig_logger_block(value):
    rejected('loggers', value)


# -- zookeeper connection strings ------------------------------------------------------------

GOOD_ZOOKEEPER = [
    '127.0.0.1:2181',
    'localhost',
    'zk.example.com:2181',
    'zk1:2181,zk2:2182,zk3:2183',
    'zk1:2181,zk2:2181/my/chroot',
    '127.0.0.1:2181/chroot',
    '[::1]:2181',
    '[::1]',
    '[::1]:2181,127.0.0.1:2182/chroot',
    'zk1:2181, zk2:2181',
]


@pytest.mark.parametrize('value', GOOD_ZOOKEEPER)
def test_good_zookeeper_strings(value):
    settings = make_settings({'zookeeper': value, 'path': '/services/app'})
    assert settings.zookeeper == value.strip()
    assert settings.registers
    hosts, chroot = collect_hosts(settings.zookeeper)  # what kazoo makes of it
    assert len(hosts) == value.count(',') + 1
    assert all(host and 0 < port < 65536 for host, port in hosts)


@pytest.mark.parametrize('value, hosts, addresses, chroot', [
    ('h1:2181,h2:2182/app/zk', 'h1:2181,h2:2182', (('h1', 2181), ('h2', 2182)), '/app/zk'),
    ('h1', 'h1', (('h1', 2181),), ''),  # ZooKeeper's port when none is given
    (' [::1]:2181,127.0.0.1/a ', '[::1]:2181,127.0.0.1', (('::1', 2181), ('127.0.0.1', 2181)), '/a'),
    ('zk1:2181, zk2:2181', 'zk1:2181, zk2:2181', (('zk1', 2181), ('zk2', 2181)), ''),
])
def test_zookeeper_string_is_parsed_once(value, hosts, addresses, chroot):
    servers = make_settings({'zookeeper': value, 'path': '/p'}).zookeeper
    assert servers == value.strip()
    assert (servers.hosts, servers.addresses, servers.chroot) == (hosts, addresses, chroot)
    assert collect_hosts(servers.hosts) == (list(addresses), None)  # kazoo reads the same servers


def test_settings_made_directly_carry_the_parsed_form_too():
    assert Settings(zookeeper='zk:2182/c').zookeeper.addresses == (('zk', 2182),)
    with pytest.raises(ConfigError, match='^zookeeper: '):
        Settings(zookeeper='zk:x')


def test_option_facts_come_from_the_fields():
    fields = {field.name: field for field in dataclasses.fields(Settings)}
    assert set(OPTIONS) == {name for name, field in fields.items() if 'check' in field.metadata}
    assert {'config_file', 'app_name'}.isdisjoint(OPTIONS)
    assert {'host', 'port', 'zookeeper', 'path', 'node_format'} <= set(RESTART_ONLY) <= set(OPTIONS)
    assert {'workers', 'threads', 'timeout', 'name'}.isdisjoint(RESTART_ONLY)


def test_node_formats_are_nodeformats():
    for node_format in FORMATS:
        assert make_settings({'node_format': node_format.upper()}).node_format == node_format
    assert ', '.join(FORMATS) in rejected('node_format', 'json')


def test_zookeeper_string_with_ipv6_and_chroot_as_kazoo_reads_it():
    value = make_settings({'zookeeper': '[::1]:2181,127.0.0.1:2182/a/b', 'path': '/p'}).zookeeper
    assert collect_hosts(value) == ([('::1', 2181), ('127.0.0.1', 2182)], '/a/b')


@pytest.mark.parametrize('value', [
    '',
    ' ',
    ',',
    '127.0.0.1:2181,',
    ',127.0.0.1:2181',
    ':2181',
    '127.0.0.1:abc',
    '127.0.0.1:70000',
    '127.0.0.1:0',
    '127.0.0.1:',
    '127.0.0.1:2181:2181',
    '127.0.0.1:2181/chroot/',
    '127.0.0.1:2181//chroot',
    '127.0.0.1:2181/a/../b',
    '::1:2181',
    '[::1',
    '[::1]:',
    'zk one:2181',
    'http://zk:2181',
])
def test_bad_zookeeper_strings(value):
    rejected('zookeeper', value, path='/services/app')


def test_zookeeper_needs_a_path():
    with pytest.raises(ConfigError) as caught:
        make_settings({'zookeeper': '127.0.0.1:2181'})
    assert str(caught.value).startswith('path: ')


def test_path_without_zookeeper_is_unregistered():
    settings = make_settings({'path': '/services/app'})
    assert not settings.registers


# -- paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize('value', ['/', '/a', '/services/my-app/providers', ' /a/b '])
def test_good_paths(value):
    assert make_settings({'path': value}).path == value.strip()


@pytest.mark.parametrize('value', ['', 'a', 'a/b', '/a/', '/a//b', '/a/./b', '/a/../b', '//'])
def test_bad_paths(value):
    assert repr(value.strip()) in rejected('path', value)


@pytest.mark.parametrize('value', ['/a/p\x01', '/a/p\x7f', '/a/\x90x', '/a/\ue000', '/a/\ufff5',
                                   '/a/\U0001f600'])
def test_paths_with_characters_zookeeper_refuses(value):
    assert 'ZooKeeper refuses the character U+' in rejected('path', value)


@pytest.mark.parametrize('zookeeper, path', [('h:1', '/zookeeper'), ('h:1', '/zookeeper/x'),
                                             ('h:1/zookeeper', '/x'), ('h:1/zookeeper', '/')])
def test_the_reserved_zookeeper_subtree_is_refused(zookeeper, path):
    with pytest.raises(ConfigError, match="reserved /zookeeper subtree"):
        make_settings({'zookeeper': zookeeper, 'path': path})


@pytest.mark.parametrize('zookeeper, path', [('h:1', '/zookeeperish'), ('h:1/apps', '/zookeeper'),
                                             ('h:1', '/é/ü')])
def test_paths_zookeeper_takes(zookeeper, path):
    assert make_settings({'zookeeper': zookeeper, 'path': path}).path == path


# -- the other options ------------------------------------------------------------------------------

@pytest.mark.parametrize('value, expected', [
    ('127.0.0.1:8081', ('127.0.0.1', 8081)),
    (':8081', ('', 8081)),
    ('[::1]:8081', ('::1', 8081)),
    ('localhost:0', ('localhost', 0)),
])
def test_good_monitor_server(value, expected):
    assert make_settings({'monitor_server': value}).monitor_server == expected


@pytest.mark.parametrize('value', ['127.0.0.1', '8081', 'localhost:99999', 'a:b:c', ''])
def test_monitor_server_needs_host_and_port(value):
    rejected('monitor_server', value)


def test_unknown_option_is_named():
    message = rejected('colour', 'blue')
    assert 'workers' in message  # the known options are listed


def test_unknown_option_is_reported_before_bad_values():
    with pytest.raises(ConfigError) as caught:
        make_settings({'workers': '0', 'Workers': '2'})
    assert str(caught.value).startswith('Workers: ')


def _tracelog_installed():
    try:
        return importlib.util.find_spec('zc.zservertracelog') is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize('value', ['false', 'off', '0', 'no'])
def test_zservertracelog_off(value):
    assert make_settings({'zservertracelog': value}).zservertracelog is False


def test_zservertracelog_on():
    if _tracelog_installed():
        assert make_settings({'zservertracelog': 'true'}).zservertracelog is True
    else:
        assert 'zc.zservertracelog' in rejected('zservertracelog', 'true')


def test_zservertracelog_not_a_boolean():
    assert "'maybe'" in rejected('zservertracelog', 'maybe')


def test_name_and_pidfile():
    settings = make_settings({'name': ' my-app ', 'pidfile': 'run/zk.pid'})
    assert settings.name == 'my-app'
    assert settings.pidfile == os.path.abspath('run/zk.pid')
    assert make_settings({'name': '', 'pidfile': ''}) == Settings()


def test_name_is_what_an_http_header_carries():
    """It goes into the Server response header."""
    assert make_settings({'name': 'shop (eu-1) ~v2.0!'}).name == 'shop (eu-1) ~v2.0!'
    for value in ('myname\nX-Injected: yes', 'a\rb', 'caf\u20ac', 'caf\u00e9', 'a\x01b', 'a\tb', 'a\x7fb'):
        message = rejected('name', value)
        assert message == (f'name: {value!r} is not allowed in an HTTP header: printable ASCII '
                           'characters and spaces only'), message


def test_host_is_stripped():
    assert make_settings({'host': ' 127.0.0.1 '}).host == '127.0.0.1'


@pytest.mark.parametrize('option', ['zookeeper_cert_file', 'zookeeper_key_file'])
def test_tls_options_without_a_ca_file_are_refused(option, tls_files):
    both = {'zookeeper_cert_file': tls_files['client_cert'], 'zookeeper_key_file': tls_files['client_key']}
    with pytest.raises(ConfigError, match=r'^zookeeper_cert_file: TLS needs zookeeper_ca_file'):
        make_settings(both)
    with pytest.raises(ConfigError, match=r'^zookeeper_(cert|key)_file: '):
        make_settings({option: both[option]})
    assert make_settings({**both, 'zookeeper_ca_file': tls_files['ca']}).zookeeper_ca_file == tls_files['ca']


def _encrypted_key(path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b'secret')))
    return str(path)


@pytest.mark.parametrize('option, bad, expected', [
    ('zookeeper_ca_file', 'not_pem', 'no CA certificate loads (NO_CERTIFICATE_OR_CRL_FOUND)'),
    ('zookeeper_cert_file', 'not_pem', 'no certificate loads (NO_CERTIFICATE_OR_CRL_FOUND)'),
    ('zookeeper_key_file', 'not_pem', 'unusable as the client key (not PEM)'),
    ('zookeeper_key_file', 'rogue_client_key',
     'unusable as the client key (the key does not match zookeeper_cert_file)'),
    ('zookeeper_key_file', 'encrypted', 'is encrypted: zkprefork gives ZooKeeper client keys no password'),
])
def test_zookeeper_tls_files_are_loaded_at_start(tls_files, tmp_path, option, bad, expected):
    """Readable is not enough: kazoo would fail on every connection attempt."""
    (tmp_path / 'not_pem').write_text('myhost\n')  # such as /etc/hostname
    files = {**tls_files, 'not_pem': str(tmp_path / 'not_pem'),
             'encrypted': _encrypted_key(tmp_path / 'encrypted.key')}
    good = {'zookeeper_ca_file': files['ca'], 'zookeeper_cert_file': files['client_cert'],
            'zookeeper_key_file': files['client_key']}
    assert make_settings(good).zookeeper_key_file == files['client_key']
    message = rejected(option, files[bad], **{name: path for name, path in good.items() if name != option})
    assert message.startswith(f'{option}: {files[bad]!r}') and expected in message, message


def test_hostname_checking_alone_is_refused_without_tls():
    with pytest.raises(ConfigError, match=r'^zookeeper_check_hostname: TLS needs zookeeper_ca_file'):
        make_settings({'zookeeper_check_hostname': 'false'})


def test_whitespace_in_host_is_refused():
    with pytest.raises(ConfigError, match=r"^host: '127.0.0.1\\nloggers = x'"):
        make_settings({'host': '127.0.0.1\nloggers = x'})


# -- credentials: where they are, never what they are ----------------------------------------------

def test_credentials_are_checked_for_presence_without_being_read(tmp_path, monkeypatch):
    secret = tmp_path / 'credentials'
    secret.write_text('not even of the form user:password')  # the registrar checks the form
    settings = make_settings({'zookeeper_credentials_file': str(secret)})
    assert settings.zookeeper_credentials_file == str(secret)
    monkeypatch.setenv('ZKPF_TEST_CREDENTIALS', 'x')
    assert make_settings({'zookeeper_credentials_env': 'ZKPF_TEST_CREDENTIALS'}).zookeeper_credentials_env \
        == 'ZKPF_TEST_CREDENTIALS'


def test_missing_or_empty_credentials_are_refused(tmp_path, monkeypatch):
    empty = tmp_path / 'empty'
    empty.write_text('')
    assert 'is empty' in rejected('zookeeper_credentials_file', str(empty))
    assert 'not a readable file' in rejected('zookeeper_credentials_file', str(tmp_path / 'missing'))
    monkeypatch.delenv('ZKPF_TEST_CREDENTIALS', raising=False)
    assert 'not set' in rejected('zookeeper_credentials_env', 'ZKPF_TEST_CREDENTIALS')
    monkeypatch.setenv('ZKPF_TEST_CREDENTIALS', '  ')
    assert 'not set' in rejected('zookeeper_credentials_env', 'ZKPF_TEST_CREDENTIALS')


def test_health_check_options():
    zookeeper = {'zookeeper': 'zk', 'path': '/svc'}
    settings = make_settings(zookeeper)
    # HAProxy's defaults: inter 2 s, rise 2, fall 3; the check's timeout is the interval.
    assert (settings.health_check, settings.health_check_interval, settings.health_check_timeout,
            settings.health_check_rise, settings.health_check_fall) == (None, 2.0, None, 2, 3)
    settings = make_settings({**zookeeper, 'health_check': ' /healthz?full=1 ',
                              'health_check_interval': '0.5', 'health_check_fall': '1'})
    assert (settings.health_check, settings.health_check_interval, settings.health_check_fall) == \
        ('/healthz?full=1', 0.5, 1)
    assert 'is not a request path' in rejected('health_check', 'healthz', **zookeeper)
    assert 'is not a request path' in rejected('health_check', '/a b', **zookeeper)
    assert 'more than zero' in rejected('health_check_interval', '0', **zookeeper)
    assert 'more than zero' in rejected('health_check_timeout', '0', **zookeeper)
    assert 'out of range' in rejected('health_check_rise', '0', **zookeeper)
    assert 'it needs zookeeper' in rejected('health_check', '/healthz')


def test_each_command_line_flag_is_a_settings_field_with_its_default_in_the_help():
    from zkprefork import cli
    from zkprefork.settings import COMMAND_LINE
    helps = {action.dest: action for action in cli._parser()._actions}
    assert [field.name for field in COMMAND_LINE] == [
        'zookeeper', 'path', 'host', 'port', 'threads', 'workers', 'pidfile',
        'certfile', 'keyfile', 'ca_certs', 'cert_reqs', 'ciphers']
    assert '--ca-certs' in cli._parser().format_help()  # gunicorn's spelling
    for field in COMMAND_LINE:
        shown = helps[field.name].help
        assert shown.startswith(field.metadata['flag'][1])
        assert (f'(default {field.default!r})' in shown) == (field.default is not None)
