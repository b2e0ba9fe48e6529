"""What a registration looks like in ZooKeeper, in each node format.

Pure functions. Forwards: the endpoints (host, port), zkprefork's own data
(pid, instance, workers, generation, monitor) and the user's properties give
the nodes to create. Backwards: an existing node tells what it claims (the
endpoint it advertises, the master pid behind it, whether this very master
wrote it), which is what the registrar needs to decide who owns a name.

``zk`` (zc.zk / zc.zkzopeserver), one node per endpoint::

    <path>/127.0.0.1:8080
    {"pid":4525,"monitor":"127.0.0.1:8081","instance":"5f0c...","workers":2,"generation":0,"dc":"east"}

``serverset`` (Finagle / twitter commons ServerSet, read by Synapse too; a
``shard`` property that is an integer becomes the member's shard, the other
properties go in ``metadata``, zkprefork's own data in ``zkprefork``)::

    <path>/member_0000000007   (ephemeral, sequential)
    {"serviceEndpoint":{"host":"127.0.0.1","port":8080},
     "additionalEndpoints":{"http":{"host":"127.0.0.1","port":8080},"monitor":{"host":"127.0.0.1","port":8081}},
     "status":"ALIVE","shard":3,"metadata":{"dc":"east"},
     "zkprefork":{"pid":4525,"instance":"5f0c...","workers":2,"generation":0}}

``curator`` (Curator x-discovery ServiceInstance, as its JsonInstanceSerializer
writes it in compatible mode; the name is the path's last component, the id
is derived from the master's instance id and the endpoint, the properties
are the payload)::

    <path>/0b9f6d3c-...   (the id)
    {"name":"providers","id":"0b9f6d3c-...","address":"127.0.0.1","port":8080,"sslPort":null,
     "payload":{"dc":"east"},"registrationTimeUTC":1700000000000,"serviceType":"DYNAMIC",
     "uriSpec":{"parts":[{"value":"scheme","variable":true},{"value":"://","variable":false},
                         {"value":"address","variable":true},{"value":":","variable":false},
                         {"value":"port","variable":true}]}}

With TLS (``certfile``), each says so the way its readers expect: ``zk``
adds ``"scheme":"https"``; ``serverset`` names the endpoint ``https`` in
``additionalEndpoints`` (instead of ``http``); ``curator`` sets ``sslPort``
(``port`` null) and a uriSpec of ``{scheme}://{address}:{ssl-port}``.
"""
import json
import typing
import uuid

from zkprefork.addresses import format_address, parse_address

# zkprefork's own keys in the node data; a user's properties may not use them.
OWN_KEYS = ('pid', 'instance', 'workers', 'generation')
# 'scheme' is in the data only when it is 'https' (a plain server's data is
# zc.zkzopeserver's).
RESERVED_KEYS = OWN_KEYS + ('monitor', 'scheme')
# Anything random would do; fixed so that the same master always derives the
# same Curator ids.
_CURATOR_NAMESPACE = uuid.UUID('6f0c1f52-8a7e-4d4e-9a43-3c1f4c2b8e11')


class Node(typing.NamedTuple):
    endpoint: tuple  # (host, port)
    name: str  # the child's name; for a sequential node, its prefix
    data: bytes
    sequential: bool = False


class Claim(typing.NamedTuple):
    """What an existing node says about itself."""
    endpoint: tuple = None  # (host, port) it advertises
    pid: int = None  # the master behind it, where the format carries one
    same_instance: bool = False  # written by this very master (an earlier session)


class Registration(typing.NamedTuple):
    """What every node of one registration is built from."""
    path: str  # the service path
    data: dict  # zkprefork's own data: OWN_KEYS, 'monitor' (host:port or None), 'scheme' if https
    properties: dict  # the user's key = value pairs
    registered_at: int  # ms since the epoch (Curator's registrationTimeUTC)


class Advertised(typing.NamedTuple):
    """What a discovery reader makes of a node: a provider that is alive."""
    host: str
    port: int  # 1-65535
    scheme: str  # 'http' or 'https'
    data: dict  # the node's JSON object, {} if it holds none


class Format(typing.NamedTuple):
    """One node format. `build(registration, endpoint)` -> Node;
    `read(name, value, instance)` -> Claim, `value` a dict decoded from the
    node's JSON (a format without a pid in its data leaves Claim.pid None);
    `member_prefix` names the sequential nodes of formats that use them;
    `advertised(name, value)` -> (host, port, scheme) of a provider that is
    alive, else None (a reader's view, of any writer's node: see read_advertised)."""
    name: str
    build: typing.Callable
    read: typing.Callable
    member_prefix: str = None
    advertised: typing.Callable = None


def nodes(node_format, path, endpoints, data, properties=(), registered_at=0):
    """The nodes that register every (host, port) of `endpoints` in the
    format named `node_format` (one of FORMATS)."""
    registration = Registration(path, data, dict(properties), registered_at)
    return [TABLE[node_format].build(registration, (host, port)) for host, port in endpoints]


def read_claim(node_format, name, raw, instance):
    """What the existing child `name` with data `raw` claims, and whether the
    master whose instance id is `instance` wrote it."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        return Claim(endpoint=parse_address(name) if node_format == 'zk' else None)
    return TABLE[node_format].read(name, value, instance)


def read_advertised(node_format, name, raw):
    """The provider that the child `name` with data `raw` (bytes) advertises
    as a reader of `node_format` sees it, zkprefork's nodes or another
    writer's: an Advertised, or None for a node that is no live provider (a
    ServerSet member whose status is not ALIVE, a Curator instance with
    "enabled": false, a node that is none of the format's)."""
    try:
        value = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        # zc.zk's nodes say it all in their name; the others need their data.
        value = {} if node_format == 'zk' else None
    found = value is not None and TABLE[node_format].advertised(name, value)
    return Advertised(*found, value) if found else None


def _encode(value):
    return json.dumps(value, separators=(',', ':')).encode()


def _zk_node(registration, endpoint):
    data = registration.data
    # pid and monitor first, as zc.zkzopeserver wrote them.
    value = {'pid': data['pid']}
    if data.get('monitor'):
        value['monitor'] = data['monitor']
    value.update((key, item) for key, item in data.items() if key not in ('pid', 'monitor'))
    value.update(registration.properties)
    return Node(endpoint, format_address(*endpoint), _encode(value))


def _zk_claim(name, value, instance):
    return Claim(parse_address(name), _pid(value.get('pid')),
                 value.get('instance') == instance)


def _zk_advertised(name, value):
    endpoint = parse_address(name)
    if endpoint is None or not endpoint[0] or not _is_port(endpoint[1]):
        return None
    return (*endpoint, 'https' if value.get('scheme') == 'https' else 'http')


SERVERSET_MEMBER_PREFIX = 'member_'


def _serverset_node(registration, endpoint):
    data, properties = registration.data, dict(registration.properties)
    here = _host_port(endpoint)
    extra = {data.get('scheme', 'http'): here}
    if data.get('monitor'):
        monitor = parse_address(data['monitor'])
        if monitor:
            extra['monitor'] = _host_port((monitor[0] or endpoint[0], monitor[1]))
    value = {'serviceEndpoint': here, 'additionalEndpoints': extra, 'status': 'ALIVE'}
    shard = properties.pop('shard', None)
    if shard is not None and shard.isdigit():
        value['shard'] = int(shard)
    elif shard is not None:
        properties['shard'] = shard
    if properties:
        # Finagle reads metadata as a map of strings, which properties are.
        value['metadata'] = properties
    value['zkprefork'] = {key: data[key] for key in OWN_KEYS if key in data}
    return Node(endpoint, SERVERSET_MEMBER_PREFIX, _encode(value), sequential=True)


def _serverset_claim(name, value, instance):
    service = value.get('serviceEndpoint')
    own = value.get('zkprefork') if isinstance(value.get('zkprefork'), dict) else {}
    endpoint = (service.get('host'), service.get('port')) if isinstance(service, dict) else None
    return Claim(endpoint, _pid(own.get('pid')), own.get('instance') == instance)


def _serverset_advertised(name, value):
    # Finagle's readers (serverset2) list only member_* children; Status ALIVE
    # is the only one that takes traffic (DEAD, STARTING, STOPPING... do not).
    if not name.startswith(SERVERSET_MEMBER_PREFIX) or value.get('status') != 'ALIVE':
        return None
    service = _endpoint_of(value.get('serviceEndpoint'))
    extra = value.get('additionalEndpoints')
    if service is None:
        return None
    secure = isinstance(extra, dict) and _endpoint_of(extra.get('https')) == service
    return (*service, 'https' if secure else 'http')


def _endpoint_of(item):
    """(host, port) of a ServerSet Endpoint {"host": str, "port": int}, or None."""
    if not isinstance(item, dict) or not isinstance(item.get('host'), str) or not item['host']:
        return None
    return (item['host'], item['port']) if _is_port(item.get('port')) else None


def curator_id(instance, endpoint):
    """A stable id per master and endpoint: a restarted registrar finds the
    name its predecessor used, while another master never collides with it."""
    return str(uuid.uuid5(_CURATOR_NAMESPACE, f'{instance}/{format_address(*endpoint)}'))


def curator_uri_spec(secure):
    """Curator's UriSpec of `{scheme}://{address}:{port}` (or `{ssl-port}`),
    as its JSON serializer writes it: buildUriSpec() makes the server's URL
    from it (scheme is https when sslPort is set)."""
    template = [('scheme', True), ('://', False), ('address', True), (':', False),
                ('ssl-port' if secure else 'port', True)]
    return {'parts': [{'value': value, 'variable': variable} for value, variable in template]}


def _curator_node(registration, endpoint):
    ident = curator_id(registration.data['instance'], endpoint)
    secure = registration.data.get('scheme') == 'https'
    value = {
        'name': registration.path.rstrip('/').rpartition('/')[2],
        'id': ident,
        'address': endpoint[0],
        'port': None if secure else endpoint[1],
        'sslPort': endpoint[1] if secure else None,
        'payload': registration.properties or None,
        'registrationTimeUTC': registration.registered_at,
        'serviceType': 'DYNAMIC',
        'uriSpec': curator_uri_spec(secure),
    }
    return Node(endpoint, ident, _encode(value))


def _curator_claim(name, value, instance):
    # The format has no room for a pid; the id tells whether we wrote it.
    port = value.get('sslPort') if value.get('port') is None else value.get('port')
    endpoint = (value.get('address'), port)
    if not isinstance(endpoint[0], str) or not isinstance(endpoint[1], int):
        return Claim()
    return Claim(endpoint, None, name == curator_id(instance, endpoint))


def _curator_advertised(name, value):
    # Curator 5's ServiceInstance: `enabled` absent means true; its UriSpec's
    # {scheme} is https whenever sslPort is set, so the TLS port wins.
    address = value.get('address')
    if value.get('enabled') is False or not isinstance(address, str) or not address:
        return None
    if _is_port(value.get('sslPort')):
        return address, value['sslPort'], 'https'
    return (address, value['port'], 'http') if _is_port(value.get('port')) else None


def _is_port(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65535


def _host_port(endpoint):
    return {'host': endpoint[0], 'port': endpoint[1]}


def _pid(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# Adding a format: its three functions above, one row here, its tests and
# README's "Node formats".
TABLE = {format.name: format for format in (
    Format('zk', _zk_node, _zk_claim, advertised=_zk_advertised),
    Format('serverset', _serverset_node, _serverset_claim, SERVERSET_MEMBER_PREFIX, _serverset_advertised),
    Format('curator', _curator_node, _curator_claim, advertised=_curator_advertised),
)}
FORMATS = tuple(TABLE)
