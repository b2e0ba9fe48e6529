"""Node names and data of each format, read back by readers written from
each format's public description (tests/support.py), and what existing
nodes claim about themselves."""
import json

from support import (read_curator_instance, read_serverset_member, read_synapse_backend,
                     read_zk_node)
from zkprefork import nodeformat

DATA = {'pid': 4525, 'instance': 'a1b2', 'workers': 2, 'generation': 3}


def test_zk_format_is_zc_zkzopeserver_s():
    [node] = nodeformat.nodes('zk', '/svc', [('127.0.0.1', 8080)], dict(DATA, monitor='127.0.0.1:8081'))
    assert node.name == '127.0.0.1:8080' and not node.sequential
    assert node.data == (b'{"pid":4525,"monitor":"127.0.0.1:8081","instance":"a1b2",'
                         b'"workers":2,"generation":3}')
    assert read_zk_node(node.name, node.data)[:2] == ('127.0.0.1', 8080)


def test_zk_format_ipv6_names_and_properties_at_top_level():
    nodes = nodeformat.nodes('zk', '/svc', [('::1', 80), ('10.0.0.1', 80)], dict(DATA, monitor=None),
                             [('dc', 'east')])
    assert [n.name for n in nodes] == ['[::1]:80', '10.0.0.1:80']
    host, port, value = read_zk_node(nodes[0].name, nodes[0].data)
    assert (host, port) == ('::1', 80)
    assert value == dict(DATA, dc='east')
    assert 'monitor' not in value


def test_serverset_member_read_by_finagle_and_synapse_rules():
    [node] = nodeformat.nodes('serverset', '/svc', [('10.0.0.1', 8080)],
                              dict(DATA, monitor='10.0.0.1:9090'), [('shard', '3'), ('dc', 'east')])
    assert node.name == 'member_' and node.sequential
    entry = read_serverset_member('member_0000000012', node.data)
    assert entry == {'service': ('10.0.0.1', 8080),
                     'additional': {'http': ('10.0.0.1', 8080), 'monitor': ('10.0.0.1', 9090)},
                     'status': 'ALIVE', 'shard': 3, 'metadata': {'dc': 'east'}}
    assert read_synapse_backend('member_0000000012', node.data) == {
        'host': '10.0.0.1', 'port': 8080, 'name': '3', 'id': 12}
    assert read_synapse_backend('member_0000000012', node.data, 'monitor')['port'] == 9090
    assert json.loads(node.data)['zkprefork'] == DATA


def test_serverset_without_properties_or_monitor():
    [node] = nodeformat.nodes('serverset', '/svc', [('::1', 8080)], DATA, [('shard', 'blue')])
    value = json.loads(node.data)
    assert value['serviceEndpoint'] == {'host': '::1', 'port': 8080}
    assert value['additionalEndpoints'] == {'http': {'host': '::1', 'port': 8080}}
    assert 'shard' not in value  # not an integer: it stays a property
    assert value['metadata'] == {'shard': 'blue'}
    assert read_serverset_member('member_0000000001', node.data)['shard'] is None
    assert read_serverset_member('lock-1', node.data) is None


def test_curator_instance():
    [node] = nodeformat.nodes('curator', '/services/shop', [('10.0.0.1', 8080)], DATA,
                              [('dc', 'east')], registered_at=1700000000123)
    value = read_curator_instance('shop', node.name, node.data)
    assert value == {'name': 'shop', 'id': node.name, 'address': '10.0.0.1', 'port': 8080,
                     'sslPort': None, 'payload': {'dc': 'east'}, 'registrationTimeUTC': 1700000000123,
                     'serviceType': 'DYNAMIC', 'uriSpec': nodeformat.curator_uri_spec(False)}
    [bare] = nodeformat.nodes('curator', '/services/shop', [('10.0.0.1', 8080)], DATA)
    assert json.loads(bare.data)['payload'] is None


def test_curator_ids_are_per_master_and_endpoint():
    first = nodeformat.curator_id('a1b2', ('10.0.0.1', 8080))
    assert first == nodeformat.curator_id('a1b2', ('10.0.0.1', 8080))
    assert first != nodeformat.curator_id('c3d4', ('10.0.0.1', 8080))
    assert first != nodeformat.curator_id('a1b2', ('10.0.0.2', 8080))


def test_claims():
    for node_format in nodeformat.FORMATS:
        [node] = nodeformat.nodes(node_format, '/svc', [('10.0.0.1', 80)], DATA)
        prefix = nodeformat.TABLE[node_format].member_prefix
        assert node.sequential == (prefix is not None) and node.name == (prefix or node.name)
        name = node.name + ('0000000001' if node.sequential else '')
        claim = nodeformat.read_claim(node_format, name, node.data, 'a1b2')
        assert claim.endpoint == ('10.0.0.1', 80)
        assert claim.same_instance
        assert claim.pid == (None if node_format == 'curator' else 4525)
        assert not nodeformat.read_claim(node_format, name, node.data, 'other').same_instance


def test_claims_of_foreign_or_broken_data():
    assert nodeformat.read_claim('zk', '10.0.0.1:80', b'not json', 'x') == (('10.0.0.1', 80), None, False)
    assert nodeformat.read_claim('zk', '10.0.0.1:80', b'{"pid":true}', 'x').pid is None
    assert nodeformat.read_claim('serverset', 'member_1', b'[]', 'x') == (None, None, False)
    assert nodeformat.read_claim('serverset', 'member_1', b'{"serviceEndpoint":{"host":"h","port":1}}',
                                 'x') == (('h', 1), None, False)
    assert nodeformat.read_claim('curator', 'id', b'{"address":null}', 'x') == (None, None, False)


def test_a_format_is_one_row_of_the_table():
    """What the registrar and the settings know of formats comes from TABLE."""
    assert nodeformat.FORMATS == tuple(nodeformat.TABLE) == ('zk', 'serverset', 'curator')
    for name, node_format in nodeformat.TABLE.items():
        assert node_format.name == name


def test_user_properties_do_not_leak_between_nodes():
    """The serverset builder moves `shard` out of the properties: each node
    must start from the user's own pairs."""
    nodes = nodeformat.nodes('serverset', '/svc', [('10.0.0.1', 80), ('10.0.0.2', 80)], DATA,
                             [('shard', '3'), ('dc', 'east')])
    for node in nodes:
        value = json.loads(node.data)
        assert (value['shard'], value['metadata']) == (3, {'dc': 'east'})


def test_tls_endpoints_in_each_format():
    data = dict(DATA, scheme='https')
    [zk] = nodeformat.nodes('zk', '/svc', [('::1', 8443)], data)
    assert json.loads(zk.data)['scheme'] == 'https'
    [member] = nodeformat.nodes('serverset', '/svc', [('::1', 8443)], data)
    backend = read_synapse_backend(member.name + '0000000001', member.data, 'https')
    assert (backend['host'], backend['port']) == ('::1', 8443)
    assert 'http' not in json.loads(member.data)['additionalEndpoints']
    [instance] = nodeformat.nodes('curator', '/svc', [('10.0.0.1', 8443)], data)
    value = json.loads(instance.data)
    assert (value['port'], value['sslPort']) == (None, 8443)
    assert curator_build_uri_spec(value) == 'https://10.0.0.1:8443'
    assert nodeformat.read_claim('curator', instance.name, instance.data, 'a1b2') == (
        ('10.0.0.1', 8443), None, True)


def test_plain_curator_uri_spec():
    [instance] = nodeformat.nodes('curator', '/svc', [('10.0.0.1', 8080)], DATA)
    assert curator_build_uri_spec(json.loads(instance.data)) == 'http://10.0.0.1:8080'


def curator_build_uri_spec(value):
    """Curator's ServiceInstance.buildUriSpec(), as its source (x-discovery
    UriSpec.build) documents it: variables scheme, address, port, ssl-port."""
    variables = {'scheme': 'https' if value['sslPort'] is not None else 'http',
                 'address': value['address'], 'port': value['port'], 'ssl-port': value['sslPort']}
    return ''.join(str(variables[part['value']]) if part['variable'] else part['value']
                   for part in value['uriSpec']['parts'])
