"""What the discovery client reads: zkprefork's servers in each node format
(plain and TLS), and nodes of other writers written here with kazoo in
their documented JSON (Curator 5's JsonInstanceSerializer, Finagle/Aurora
ServerSet members, zc.zk); and the pure parts: a node's provider, the
options' checks, round robin with quarantine."""
import json
import signal

import pytest

from support import wait_until
from zkprefork.discovery import DiscoveryError, NoProviders, Provider, Providers
from zkprefork.discovery.provider import RoundRobin
from zkprefork.errors import ConfigError
from zkprefork.nodeformat import read_advertised


def urls(providers):
    return sorted(p.url for p in providers.current())


@pytest.mark.parametrize('node_format', ['zk', 'serverset', 'curator'])
def test_zkprefork_servers_plain_and_tls_in_each_format(servers, ini, zookeeper, zk_path, tls_files, node_format):
    options = f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = 127.0.0.1\nnode_format = {node_format}\n'
    plain = servers(ini(options)).wait_serving()
    secure = servers(ini(options + f'certfile = {tls_files["server"]}\n')).wait_serving()
    with Providers(zookeeper.hosts, zk_path, node_format) as providers:
        expected = [f'http://127.0.0.1:{plain.port}', f'https://127.0.0.1:{secure.port}']
        wait_until(lambda: urls(providers) == sorted(expected), timeout=10, message=f'{expected}')
        secure.signal(signal.SIGTERM)
        wait_until(lambda: urls(providers) == [f'http://127.0.0.1:{plain.port}'], timeout=10,
                   message='the TLS server to go')


CURATOR_URI_SPEC = {'parts': [{'value': 'scheme', 'variable': True}, {'value': '://', 'variable': False},
                              {'value': 'address', 'variable': True}, {'value': ':', 'variable': False},
                              {'value': 'port', 'variable': True}]}


def curator_instance(ident, address, port=None, ssl_port=None, **extra):
    """A ServiceInstance as Curator 5's JsonInstanceSerializer writes it
    (default mode: the payload carries its @class)."""
    return {'name': 'providers', 'id': ident, 'address': address, 'port': port, 'sslPort': ssl_port,
            'payload': {'@class': 'com.example.InstanceDetails', 'dc': 'east'},
            'registrationTimeUTC': 1700000000000, 'serviceType': 'DYNAMIC', 'uriSpec': CURATOR_URI_SPEC,
            'enabled': True, **extra}


def member(host, port, status='ALIVE', **extra):
    """A ServerSet member as Finagle's and Aurora's announcers write it."""
    return {'serviceEndpoint': {'host': host, 'port': port},
            'additionalEndpoints': {'aurora': {'host': host, 'port': port},
                                    'health': {'host': host, 'port': port + 1}},
            'status': status, 'shard': 0, **extra}


def write(zk, path, children):
    for name, value in children.items():
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        zk.create(f'{path}/{name}', data, ephemeral=True, makepath=True)


def test_curator_s_own_instances(zookeeper, zk, zk_path):
    write(zk, zk_path, {
        'a1': curator_instance('a1', '10.0.0.1', 8080),
        'a2': curator_instance('a2', '10.0.0.2', 8080, 8443),  # Curator's {scheme} is https then
        'a3': curator_instance('a3', '::1', None, 9443),
        'a4': curator_instance('a4', '10.0.0.4', 8080, enabled=False),
        'a5': {k: v for k, v in curator_instance('a5', '10.0.0.5', 8080).items() if k != 'enabled'},
        'a6': b'\xac\xed\x00\x05',  # Java serialization: not this format
    })
    with Providers(zookeeper.hosts, zk_path, 'curator') as providers:
        assert [p.url for p in providers.wait(5)] == [
            'http://10.0.0.1:8080', 'https://10.0.0.2:8443', 'https://[::1]:9443', 'http://10.0.0.5:8080']
        assert providers.current()[0].data['payload'] == {'@class': 'com.example.InstanceDetails', 'dc': 'east'}
        # Curator's ServiceDiscovery.updateService() disabling an instance in place.
        zk.set(f'{zk_path}/a1', json.dumps(curator_instance('a1', '10.0.0.1', 8080, enabled=False)).encode())
        wait_until(lambda: 'http://10.0.0.1:8080' not in urls(providers), timeout=5, message='a1 disabled')


def test_finagle_and_aurora_serverset_members(zookeeper, zk, zk_path):
    write(zk, zk_path, {
        'member_0000000000': member('10.0.0.1', 31337),
        'member_0000000001': member('10.0.0.2', 31337, status='STARTING'),
        'member_0000000002': member('10.0.0.3', 31337, status='DEAD'),
        'member_0000000003': member('10.0.0.4', 443, additionalEndpoints={'https': {'host': '10.0.0.4',
                                                                                    'port': 443}}),
        'member_0000000004': b'not json',
        'singleton_lock': member('10.0.0.9', 1),  # not a member: readers list member_* only
    })
    with Providers(zookeeper.hosts, zk_path, 'serverset') as providers:
        assert [p.url for p in providers.wait(5)] == ['http://10.0.0.1:31337', 'https://10.0.0.4:443']
        assert providers.current()[0].data['additionalEndpoints']['health'] == {'host': '10.0.0.1',
                                                                                'port': 31338}
        zk.set(f'{zk_path}/member_0000000001', json.dumps(member('10.0.0.2', 31337)).encode())
        wait_until(lambda: 'http://10.0.0.2:31337' in urls(providers), timeout=5, message='STARTING -> ALIVE')
        zk.set(f'{zk_path}/member_0000000000', json.dumps(member('10.0.0.1', 31337, 'STOPPING')).encode())
        wait_until(lambda: 'http://10.0.0.1:31337' not in urls(providers), timeout=5, message='ALIVE -> STOPPING')


def test_zc_zk_nodes(zookeeper, zk, zk_path):
    write(zk, zk_path, {'10.0.0.1:8080': {'pid': 4525}, '[::1]:8081': b'', '10.0.0.3:8082': b'{bad',
                        'notanaddress': {'pid': 1}, '10.0.0.5:http': {}})
    with Providers(zookeeper.hosts, zk_path) as providers:
        assert [p.url for p in providers.wait(5)] == ['http://10.0.0.1:8080', 'http://10.0.0.3:8082',
                                                      'http://[::1]:8081']


@pytest.mark.parametrize('node_format, name, value, expected', [
    ('zk', '127.0.0.1:80', {'pid': 1, 'scheme': 'https'}, ('127.0.0.1', 80, 'https')),
    ('zk', '[::1]:80', {}, ('::1', 80, 'http')),
    ('zk', 'h:0', {}, None),
    ('zk', 'h:²', {}, None),
    ('zk', ':80', {}, None),
    ('serverset', 'member_1', member('h', 80, additionalEndpoints={'https': {'host': 'other', 'port': 80}}),
     ('h', 80, 'http')),
    ('serverset', 'member_1', member('h', True), None),
    ('serverset', 'member_1', {'status': 'ALIVE'}, None),
    ('curator', 'x', curator_instance('x', 'h', 80, 70000), ('h', 80, 'http')),
    ('curator', 'x', curator_instance('x', '', 80), None),
    ('curator', 'x', curator_instance('x', 'h', None, None), None),
])
def test_a_node_s_provider(node_format, name, value, expected):
    found = read_advertised(node_format, name, json.dumps(value).encode())
    assert (found and tuple(found[:3])) == expected
    if found:
        assert found.data == value


@pytest.mark.parametrize('arguments, message', [
    (('nohost:abc', '/p'), "zookeeper: 'nohost:abc': port 'abc' is not an integer"),
    (('', '/p'), 'zookeeper: required'),
    (('127.0.0.1:2181', 'p'), "path: 'p' is not an absolute ZooKeeper path"),
    (('127.0.0.1:2181', '/zookeeper/x'), "path: '/zookeeper/x' is in ZooKeeper's reserved"),
    (('127.0.0.1:2181', '/p', 'xml'), "node_format: 'xml' is not one of zk, serverset, curator"),
])
def test_bad_options_are_the_server_s_one_line_errors(arguments, message):
    with pytest.raises(ConfigError) as raised:
        Providers(*arguments)
    assert str(raised.value).startswith(message)


def test_security_options_are_checked_as_the_server_checks_them(tmp_path):
    with pytest.raises(ConfigError, match='zookeeper_cert_file: a client certificate needs zookeeper_key_file'):
        Providers('127.0.0.1:2181', '/p', zookeeper_ca_file=__file__, zookeeper_cert_file=__file__)
    secret = tmp_path / 'secret'
    secret.write_text('no colon here')
    with pytest.raises(ConfigError, match='zookeeper_credentials_file: .* does not hold credentials'):
        Providers('127.0.0.1:2181', '/p', zookeeper_credentials_file=secret)
    with pytest.raises(ConfigError, match="session_timeout: 'x' is not an integer"):
        Providers('127.0.0.1:2181', '/p', session_timeout='x')
    with pytest.raises(TypeError, match="unknown option 'workers'"):
        Providers('127.0.0.1:2181', '/p', workers=2)


def provider(port):
    return Provider(f'127.0.0.1:{port}', '127.0.0.1', port, 'http', {})


def test_round_robin_skips_a_refused_provider_for_the_quarantine():
    chooser = RoundRobin(quarantine=0.3)
    three = [provider(1), provider(2), provider(3)]
    assert [chooser.choose(three).port for _ in range(4)] == [1, 2, 3, 1]
    chooser.refused(three[2])
    assert [chooser.choose(three).port for _ in range(4)] == [2, 1, 2, 1]
    chooser.refused(three[0].url)
    chooser.refused(three[1])
    assert chooser.choose(three).port == 3  # all refused: the one refused longest ago
    wait_until(lambda: {chooser.choose(three).port for _ in range(3)} == {1, 2, 3}, timeout=5,
               message='the quarantine to end')
    with pytest.raises(NoProviders):
        chooser.choose([])


def test_a_protected_path_is_read_with_the_server_s_credentials_and_refused_without(
        zookeeper, kazoo_client, zk_path, tmp_path):
    from kazoo.security import make_digest_acl
    owner = kazoo_client(zookeeper.hosts, auth_data=[('digest', 'app:s3cret')])
    owner.create(zk_path, makepath=True, acl=[make_digest_acl('app', 's3cret', all=True)])
    owner.create(f'{zk_path}/127.0.0.1:9001', b'{}', ephemeral=True)
    secret = tmp_path / 'credentials'
    secret.write_text('app:s3cret\n')
    with Providers(zookeeper.hosts, zk_path, zookeeper_credentials_file=secret) as providers:
        assert [p.url for p in providers.wait(5)] == ['http://127.0.0.1:9001']
    with Providers(zookeeper.hosts, zk_path) as providers:
        with pytest.raises(DiscoveryError, match=f'refused an anonymous client to read {zk_path} '):
            providers.wait(5)
        assert providers.state == 'failed'
