"""Unit tests of the master<->registrar protocol (zkprefork.registrar_protocol):
each message as both ends write and read it, and the registrar's
configuration made from Settings and rebuilt from its line."""
import json
import subprocess
import sys

import pytest

from zkprefork.registrar.protocol import (
    CredentialsSource, ProtocolError, RegistrarConfig, Register, SessionHeld, State, TLSOptions,
    Unregister, Unregistered, make_identity, read_command, read_event)
from zkprefork.settings import make_settings

DATA = {'pid': 4525, 'instance': 'a1b2', 'workers': 2, 'generation': 3, 'monitor': None}


def test_register_on_the_wire():
    line = Register((('127.0.0.1', 8080), ('::1', 8080)), DATA).line()
    assert line.endswith('\n') and line.count('\n') == 1
    assert json.loads(line) == {'op': 'register', 'endpoints': [['127.0.0.1', 8080], ['::1', 8080]],
                                'data': DATA}
    assert read_command(line) == Register((('127.0.0.1', 8080), ('::1', 8080)), DATA)
    assert read_command(line.encode()) == read_command(line)  # as the pipe delivers it


def test_unregister_on_the_wire():
    assert json.loads(Unregister().line()) == {'op': 'unregister'}
    assert read_command(Unregister().line()) == Unregister()


@pytest.mark.parametrize('line', [
    'not json', '[]', '{}', '{"op": "reload"}',
    '{"op": "register", "endpoints": [["h"]], "data": {}}',
    '{"op": "register", "endpoints": [["h", "port"]], "data": {}}',
    '{"op": "register", "endpoints": [["h", 1]], "data": []}',
])
def test_bad_commands(line):
    with pytest.raises(ProtocolError):
        read_command(line)


def test_state_on_the_wire():
    state = State('connected', '0x1a', ['/svc/127.0.0.1:8080'], 1700000000.123, [], None, None)
    line = state.line()
    assert json.loads(line) == {'event': 'state', 'state': 'connected', 'session': '0x1a',
                                'nodes': ['/svc/127.0.0.1:8080'], 'since': 1700000000.123,
                                'problems': [], 'error': None, 'health': None}
    # The master keeps plain dicts: it pops the event's name and keeps the rest.
    assert read_event(line.encode()) == json.loads(line)


def test_unregistered_on_the_wire():
    assert read_event(Unregistered().line()) == {'event': 'unregistered'}


@pytest.mark.parametrize('line', [
    '', '{"event": "bye"}', '{"state": "connected"}',
    '{"event": "state", "state": "connected"}',  # every field, every time
    '{"event": "state", "state": "asleep", "session": null, "nodes": [], "since": 0, '
    '"problems": [], "error": null}',
    '{"event": "unregistered", "nodes": []}',
])
def test_bad_events(line):
    with pytest.raises(ProtocolError):
        read_event(line)


def test_config_from_settings_round_trip(tls_files, monkeypatch):
    pem = tls_files['ca']  # settings loads it
    monkeypatch.setenv('ZKPF_TEST_CREDENTIALS', 'app:secret')
    settings = make_settings({
        'zookeeper': 'zk1:2181,[::1]/chroot', 'path': '/svc', 'session_timeout': '4000',
        'node_format': 'serverset', 'properties': 'dc = east\nshard = 3',
        'zookeeper_credentials_env': 'ZKPF_TEST_CREDENTIALS', 'zookeeper_auth': 'sasl',
        'zookeeper_ca_file': str(pem), 'loggers': 'info'})
    config = RegistrarConfig.from_settings(settings)
    assert config == RegistrarConfig(
        'zk1:2181,[::1]', (('zk1', 2181), ('::1', 2181)), '/chroot', '/svc', 4000, 'serverset',
        (('dc', 'east'), ('shard', '3')), 'INFO',
        CredentialsSource(None, 'ZKPF_TEST_CREDENTIALS', 'sasl'), TLSOptions(str(pem), None, None, True),
        None)
    assert config.service_path == '/chroot/svc'
    line = config.line()
    assert line.endswith('\n') and line.count('\n') == 1
    assert 'secret' not in line
    assert RegistrarConfig.read(line) == config


def test_config_defaults_are_settings_defaults():
    config = RegistrarConfig.from_settings(make_settings({'zookeeper': 'zk', 'path': '/'}))
    assert (config.node_format, config.session_timeout, config.properties) == ('zk', 10000, ())
    assert config.credentials is None and config.tls is None and config.loggers is None
    assert config.service_path == '/'
    assert RegistrarConfig.read(config.line()) == config


@pytest.mark.parametrize('path, chroot, service_path', [
    ('/', '', '/'), ('/', '/c', '/c'), ('/a/b', '', '/a/b'), ('/a', '/c/d', '/c/d/a')])
def test_service_path(path, chroot, service_path):
    config = RegistrarConfig('h', (('h', 2181),), chroot, path, 1, 'zk', (), None, None, None, None)
    assert config.service_path == service_path


def test_bad_config_line():
    with pytest.raises(ProtocolError):
        RegistrarConfig.read('{"zookeeper": "h", "path": "/svc"}')


def test_the_masters_end_imports_no_kazoo():
    code = ('import sys, zkprefork.master.launch, zkprefork.cli, zkprefork.runner; '
            'print(sorted(m for m in sys.modules if m.startswith("kazoo")))')
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True).stdout == '[]\n'


def test_the_masters_own_secrets_travel_only_on_the_pipe():
    settings = make_settings({'zookeeper': 'zk', 'path': '/svc'})
    identity = make_identity()
    user, _, password = identity.partition(':')
    assert user.startswith('zkprefork-') and len(password) >= 32 and identity != make_identity()
    config = RegistrarConfig.from_settings(settings, identity, (72, 'ab' * 16))
    assert RegistrarConfig.read(config.line()) == config
    assert config.resume == (72, 'ab' * 16) and config.identity == identity
    assert password not in repr(config) and 'ab' * 16 not in repr(config)
    session = SessionHeld(72, 'ab' * 16)
    assert read_event(session.line()) == {'event': 'session', 'id': 72, 'password': 'ab' * 16}
    assert 'ab' * 16 not in repr(session)
    # With the user's credentials, their identity writes the nodes.
    with_credentials = make_settings({'zookeeper': 'zk', 'path': '/svc', 'zookeeper_credentials_file': __file__})
    assert RegistrarConfig.from_settings(with_credentials, identity).identity is None
