"""All option checking in one place: raw strings in, a validated Settings out.

The server section of the ini and the command line both arrive here as a
mapping of option name to string; nothing downstream re-checks a value.
"""
import dataclasses
import importlib.util
import io
import ipaddress
import logging
import os
import re

from paste.deploy.converters import asbool


class ConfigError(Exception):
    """A bad option or file: reported as one line, exit status 2."""


def _integer(option, value, low, high=None):
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f'{option}: {value!r} is not an integer') from None
    if number < low or (high is not None and number > high):
        bounds = f'from {low} to {high}' if high is not None else f'at least {low}'
        raise ConfigError(f'{option}: {value!r} is out of range (must be {bounds})')
    return number


def _seconds(option, value):
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ConfigError(f'{option}: {value!r} is not a number of seconds') from None
    if not number >= 0 or number == float('inf'):
        raise ConfigError(f'{option}: {value!r} must be zero or more seconds')
    return number


def _positive_seconds(option, value):
    number = _seconds(option, value)
    if number == 0:
        raise ConfigError(f'{option}: {value!r} must be more than zero seconds')
    return number


def _forwarded_allow_ips(value):
    """Addresses or networks, separated by commas or spaces; `*` for all."""
    items = tuple(value.replace(',', ' ').split())
    if items == ('*',):
        return items
    try:
        return tuple(str(ipaddress.ip_network(item, strict=False)) for item in items)
    except ValueError:
        raise ConfigError(f'forwarded_allow_ips: {value!r} is not a list of addresses or networks, '
                          'or *') from None


def _boolean(option, value):
    try:
        return asbool(value)
    except ValueError:
        raise ConfigError(f'{option}: {value!r} is not true or false') from None


_HOST_PORT = re.compile(r'^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]*)(?::(?P<port>[^:]*))?$')


def _split_host_port(option, value, port_required, whole=None):
    """(host, port or None); errors quote `whole`, the value as the user wrote it."""
    whole = value if whole is None else whole
    match = _HOST_PORT.match(value)
    if not match or (port_required and not match['port']):
        raise ConfigError(f'{option}: {whole!r} is not of the form HOST:PORT')
    host = match['host'].strip('[]')
    if match['port'] is None:
        return host, None
    try:
        port = int(match['port'])
    except ValueError:
        raise ConfigError(f'{option}: {whole!r}: port {match["port"]!r} is not an integer') from None
    if not 0 <= port <= 65535:
        raise ConfigError(f'{option}: {whole!r}: port {port} is out of range (must be from 0 to 65535)')
    return host, port


def _zookeeper(value):
    """Check a kazoo connection string: host[:port],...[/chroot]."""
    value = value.strip()
    hosts, slash, chroot = value.partition('/')
    if slash and ('//' in '/' + chroot or chroot.endswith('/') or not chroot):
        raise ConfigError(f'zookeeper: {value!r}: the chroot {"/" + chroot!r} is not a valid '
                          'ZooKeeper path (no empty parts, no trailing slash)')
    if slash:
        _znode_path('zookeeper', '/' + chroot)
    for member in hosts.split(','):
        host, port = _split_host_port('zookeeper', member.strip(), False, whole=value)
        if not host or port == 0:
            raise ConfigError(
                f'zookeeper: {value!r} is not a connection string '
                '(expected HOST:PORT[,HOST:PORT...][/chroot])')
    return value


def _znode_path(option, value):
    parts = value.split('/')
    if (not value.startswith('/') or value != '/' and value.endswith('/')
            or any(part in ('', '.', '..') for part in parts[1:] if value != '/')):
        raise ConfigError(f'{option}: {value!r} is not an absolute ZooKeeper path')
    return value


def _host(value):
    host = value.strip()
    if any(character.isspace() for character in host):
        raise ConfigError(f'host: {value!r} is not a host name or address')
    return host


def _loggers(value):
    """A level name (any case) or a ZConfig <logger> definition.

    ``$$(`` stands for ``%(`` because PasteDeploy's ini parser would
    otherwise try to interpolate format strings.
    """
    text = value.strip()
    if not text.startswith('<'):
        if not isinstance(logging.getLevelName(text.upper()), int):
            raise ConfigError(f'loggers: {value!r} is neither a level name nor a ZConfig logger definition')
        return text.upper()
    text = text.replace('$$(', '%(')
    try:
        _parse_zconfig_loggers(text)
    except Exception as error:  # ZConfig raises several unrelated types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f'loggers: not a valid ZConfig logger definition: {first_line}') from None
    return text


def _parse_zconfig_loggers(text):
    import ZConfig.loader
    schema = ZConfig.loader.loadSchemaFile(io.StringIO(
        "<schema><import package='ZConfig.components.logger'/>"
        "<multisection type='logger' name='*' attribute='loggers'/></schema>"))
    config, _ = ZConfig.loader.loadConfigFile(schema, io.StringIO(text))
    return config.loggers


def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _zservertracelog(value):
    enabled = _boolean('zservertracelog', value)
    if enabled and not _installed('zc.zservertracelog'):
        raise ConfigError(
            'zservertracelog: true, but zc.zservertracelog is not installed '
            "(pip install 'zkprefork[tracelog]')")
    return enabled


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the master, its workers and the registrar need to know."""

    config_file: str = None
    app_name: str = 'main'
    zookeeper: str = None
    path: str = None
    host: str = ''
    port: int = 0
    threads: int = 1
    workers: int = 1
    session_timeout: int = 10000  # milliseconds, as zc.zkzopeserver documents
    monitor_server: tuple = None  # (host, port)
    loggers: str = None
    zservertracelog: bool = False
    name: str = None
    graceful_timeout: float = 30.0
    pidfile: str = None
    boot_timeout: float = 30.0
    timeout: float = 30.0  # heartbeat; 0 = off
    max_requests: int = 0  # 0 = never recycle
    max_requests_jitter: int = 0
    max_memory: int = 0  # MB of resident memory; 0 = no limit
    preload: bool = False
    access_log: str = None  # a file, or '-' for standard output
    zookeeper_credentials_file: str = None  # a file holding user:password
    zookeeper_credentials_env: str = None  # an environment variable holding user:password
    zookeeper_auth: str = 'digest'  # how credentials are used: digest or sasl
    zookeeper_ca_file: str = None  # TLS is on when this is set
    zookeeper_cert_file: str = None
    zookeeper_key_file: str = None
    zookeeper_check_hostname: bool = True
    node_format: str = 'zk'
    properties: tuple = ()  # ((key, value), ...) added to the node data
    # HTTP (httprequest.HTTPOptions; gunicorn's names where they match)
    limit_request_line: int = 4094  # bytes -> 414
    limit_request_fields: int = 200  # header fields -> 431
    limit_request_field_size: int = 65536  # bytes of one header field -> 431
    limit_request_header_size: int = 262144  # bytes of the request line and header fields -> 431
    max_request_body_size: int = 1 << 30  # bytes (1 GiB), de-chunked -> 413
    request_read_timeout: float = 30.0  # s for the headers, and of silence inside a body -> 408
    request_body_min_rate: int = 500  # bytes/s a body must average, after request_read_timeout -> 408
    keepalive: float = 2.0  # s a connection may stay idle (before its first byte, between requests)
    outbuf_high_watermark: int = 4 << 20  # bytes of response buffered before the application waits
    send_timeout: float = 60.0  # s a client may read nothing of a response before it is dropped
    forwarded_allow_ips: tuple = ('127.0.0.1/32',)  # networks trusted for X-Forwarded-*, or ('*',)

    @property
    def registered(self):
        return self.zookeeper is not None


def _readable_file(option, value):
    path = os.path.abspath(value.strip())
    if not os.access(path, os.R_OK) or not os.path.isfile(path):
        raise ConfigError(f'{option}: {value!r} is not a readable file')
    return path


def _credentials_file(value):
    path = _readable_file('zookeeper_credentials_file', value)
    with open(path) as file:
        _check_credentials('zookeeper_credentials_file', value, file.read().strip())
    return path


def _credentials_env(value):
    name = value.strip()
    _check_credentials('zookeeper_credentials_env', value, os.environ.get(name, ''))
    return name


def _check_credentials(option, value, secret):
    # The secret itself never goes into a message.
    user, colon, password = secret.partition(':')
    if not (user and colon and password):
        raise ConfigError(f'{option}: {value!r} does not hold credentials of the form user:password')


def _access_log(value):
    value = value.strip()
    if value in ('', '-'):
        return value or None
    path = os.path.abspath(value)
    if not os.access(os.path.dirname(path), os.W_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ConfigError(f'access_log: {value!r} is not writable')
    return path


def _check_zookeeper_security(checked):
    if bool(checked.get('zookeeper_cert_file')) != bool(checked.get('zookeeper_key_file')):
        raise ConfigError('zookeeper_cert_file: a client certificate needs zookeeper_key_file too')
    # TLS is on only with a CA file: without one these would silently do nothing.
    tls_only = [name for name in ('zookeeper_cert_file', 'zookeeper_key_file', 'zookeeper_check_hostname')
                if name in checked]
    if tls_only and not checked.get('zookeeper_ca_file'):
        raise ConfigError(f'{tls_only[0]}: TLS needs zookeeper_ca_file (without it the '
                          'connection to ZooKeeper is not encrypted)')
    if checked.get('zookeeper_auth') == 'sasl' and not _installed('puresasl'):
        raise ConfigError("zookeeper_auth: sasl needs the pure-sasl package "
                          "(pip install 'zkprefork[sasl]')")


def _choice(option, value, choices):
    value = value.strip().lower()
    if value not in choices:
        raise ConfigError(f'{option}: {value!r} is not one of {", ".join(choices)}')
    return value


RESERVED_DATA = ('pid', 'workers', 'generation', 'instance', 'monitor')


def _properties(value):
    """`key = value` pairs, one per line."""
    pairs = []
    for item in value.strip().splitlines():
        if not item.strip():
            continue
        key, equals, val = item.partition('=')
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f'properties: {item.strip()!r} is not of the form key = value')
        if key in RESERVED_DATA:
            raise ConfigError(f'properties: {key!r} is reserved for zkprefork\'s own node data')
        pairs.append((key, val.strip()))
    return tuple(pairs)


# option name -> function(value) returning the checked value
_CHECKS = {
    'zookeeper': _zookeeper,
    'path': lambda v: _znode_path('path', v.strip()),
    'host': _host,
    'port': lambda v: _integer('port', v, 0, 65535),
    'threads': lambda v: _integer('threads', v, 1, 10000),
    'workers': lambda v: _integer('workers', v, 1, 1000),
    'session_timeout': lambda v: _integer('session_timeout', v, 1),
    'monitor_server': lambda v: _split_host_port('monitor_server', v.strip(), True),
    'loggers': _loggers,
    'zservertracelog': _zservertracelog,
    'name': lambda v: v.strip() or None,
    'graceful_timeout': lambda v: _seconds('graceful_timeout', v),
    'pidfile': lambda v: os.path.abspath(v.strip()) if v.strip() else None,
    'boot_timeout': lambda v: _seconds('boot_timeout', v),
    'timeout': lambda v: _seconds('timeout', v),
    'max_requests': lambda v: _integer('max_requests', v, 0),
    'max_requests_jitter': lambda v: _integer('max_requests_jitter', v, 0),
    'max_memory': lambda v: _integer('max_memory', v, 0),
    'preload': lambda v: _boolean('preload', v),
    'access_log': _access_log,
    'zookeeper_credentials_file': _credentials_file,
    'zookeeper_credentials_env': _credentials_env,
    'zookeeper_auth': lambda v: _choice('zookeeper_auth', v, ('digest', 'sasl')),
    'zookeeper_ca_file': lambda v: _readable_file('zookeeper_ca_file', v),
    'zookeeper_cert_file': lambda v: _readable_file('zookeeper_cert_file', v),
    'zookeeper_key_file': lambda v: _readable_file('zookeeper_key_file', v),
    'zookeeper_check_hostname': lambda v: _boolean('zookeeper_check_hostname', v),
    'node_format': lambda v: _choice('node_format', v, ('zk', 'serverset', 'curator')),
    'properties': _properties,
    # HTTP
    'limit_request_line': lambda v: _integer('limit_request_line', v, 64, 1 << 20),
    'limit_request_fields': lambda v: _integer('limit_request_fields', v, 1, 32768),
    'limit_request_field_size': lambda v: _integer('limit_request_field_size', v, 64, 1 << 24),
    'limit_request_header_size': lambda v: _integer('limit_request_header_size', v, 256, 1 << 26),
    'max_request_body_size': lambda v: _integer('max_request_body_size', v, 0),
    'request_read_timeout': lambda v: _positive_seconds('request_read_timeout', v),
    'request_body_min_rate': lambda v: _integer('request_body_min_rate', v, 1),
    'keepalive': lambda v: _positive_seconds('keepalive', v),
    'outbuf_high_watermark': lambda v: _integer('outbuf_high_watermark', v, 65536),
    'send_timeout': lambda v: _positive_seconds('send_timeout', v),
    'forwarded_allow_ips': _forwarded_allow_ips,
}

# Options a reload cannot change: they are the socket, the session or the
# master's own set-up. A HUP that changes them keeps the old values and says so.
RESTART_ONLY = ('host', 'port', 'zookeeper', 'path', 'session_timeout', 'monitor_server',
                'loggers', 'access_log', 'pidfile', 'preload', 'zookeeper_credentials_file',
                'zookeeper_credentials_env', 'zookeeper_auth', 'zookeeper_ca_file',
                'zookeeper_cert_file', 'zookeeper_key_file', 'zookeeper_check_hostname',
                'node_format', 'properties')

OPTIONS = tuple(_CHECKS)


def make_settings(options, **fixed):
    """Check raw option strings (ini and command line merged) into Settings.

    `fixed` carries values that are not user options in the server section
    (the config file, the app name).
    """
    unknown = sorted(set(options) - set(_CHECKS))
    if unknown:
        raise ConfigError(f'{unknown[0]}: unknown option (known options: {", ".join(sorted(OPTIONS))})')
    checked = {name: _CHECKS[name](value) for name, value in options.items()
               if value is not None}
    if checked.get('zookeeper') and not checked.get('path'):
        raise ConfigError('path: required when zookeeper is set')
    if checked.get('zookeeper_credentials_file') and checked.get('zookeeper_credentials_env'):
        raise ConfigError('zookeeper_credentials_env: give credentials in a file or in the '
                          'environment, not both')
    _check_zookeeper_security(checked)
    if checked.get('boot_timeout') == 0:
        raise ConfigError("boot_timeout: '0' must be more than zero seconds")
    return Settings(**fixed, **checked)
