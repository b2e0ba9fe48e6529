"""All option checking in one place: raw strings in, a validated Settings out.

The server section of the ini and the command line both arrive here as a
mapping of option name to string; nothing downstream re-checks a value.
"""
import dataclasses
import importlib.util
import io
import ipaddress
import logging
import math
import os
import unicodedata

from paste.deploy.converters import asbool

from zkprefork import tls, zookeeper_tls
from zkprefork.addresses import HOST_PORT
from zkprefork.errors import ConfigError
from zkprefork.nodeformat import FORMATS, RESERVED_KEYS


def _integer(low, high=None):
    """A check of integers from `low` (to `high`)."""
    return lambda option, value: _integer_in(option, value, low, high)


def _integer_in(option, value, low, high):
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f'{option}: {value!r} is not an integer') from None
    if number < low or (high is not None and number > high):
        bounds = f'from {low} to {high}' if high is not None else f'at least {low}'
        raise ConfigError(f'{option}: {value!r} is out of range (must be {bounds})')
    return number


def _duration(positive):
    """A check of a finite number of seconds (a float): more than zero if
    `positive`, else zero or more; the error states that very limit."""
    limit = 'more than zero seconds' if positive else 'zero or more seconds'

    def check(option, value):
        try:
            number = float(str(value).strip())
        except ValueError:
            raise ConfigError(f'{option}: {value!r} is not a number of seconds') from None
        if not math.isfinite(number):
            raise ConfigError(f'{option}: {value!r} is not a finite number (must be {limit})')
        if number < 0 or (positive and number == 0):
            raise ConfigError(f'{option}: {value!r} is out of range (must be {limit})')
        return number
    return check


_seconds = _duration(positive=False)
_positive_seconds = _duration(positive=True)


def _forwarded_allow_ips(option, value):
    """Addresses or networks, separated by commas or spaces; `*` for all."""
    items = tuple(value.replace(',', ' ').split())
    if items == ('*',):
        return items
    try:
        return tuple(str(ipaddress.ip_network(item, strict=False)) for item in items)
    except ValueError:
        raise ConfigError(f'{option}: {value!r} is not a list of addresses or networks, '
                          'or *') from None


def _boolean(option, value):
    try:
        return asbool(value)
    except ValueError:
        raise ConfigError(f'{option}: {value!r} is not true or false') from None


def _split_host_port(option, value, port_required, whole=None):
    """(host, port or None); errors quote `whole`, the value as the user wrote it."""
    whole = value if whole is None else whole
    match = HOST_PORT.match(value)
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


class ConnectionString(str):
    """A ZooKeeper connection string, ``host[:port],...[/chroot]``, parsed
    once: the string itself (as the user wrote it, stripped), ``hosts`` (for
    kazoo, without the chroot), ``addresses`` (((host, port), ...), port 2181
    where none is given) and ``chroot`` ('' or '/a/b'). Raises ConfigError.

    ``hosts`` and ``addresses`` name each server once, in the order first
    given: a server named twice would be tried twice as often, and twice
    in a row now and then."""

    def __new__(cls, text):
        self = super().__new__(cls, text.strip())
        hosts, slash, chroot = self.partition('/')
        self.chroot = _chroot(self, chroot) if slash else ''
        servers = {}  # (host, port) -> the member as written, first one kept
        for member in hosts.split(','):
            host, port = _zookeeper_server(self, member)
            servers.setdefault((host.lower(), port), ((host, port), member))
        self.addresses = tuple(address for address, _ in servers.values())
        self.hosts = ','.join(member for _, member in servers.values())
        return self


def _chroot(whole, chroot):
    if '//' in '/' + chroot or chroot.endswith('/') or not chroot:
        raise ConfigError(f'zookeeper: {whole!r}: the chroot {"/" + chroot!r} is not a valid '
                          'ZooKeeper path (no empty parts, no trailing slash)')
    return _znode_path('zookeeper', '/' + chroot)


def _zookeeper_server(whole, member):
    host, port = _split_host_port('zookeeper', member.strip(), False, whole=whole)
    if not host or port == 0:
        raise ConfigError(f'zookeeper: {whole!r} is not a connection string '
                          '(expected HOST:PORT[,HOST:PORT...][/chroot])')
    return host, 2181 if port is None else port  # ZooKeeper's port


def _zookeeper(option, value):
    return ConnectionString(value)


def _znode_path(option, value):
    value = value.strip()
    parts = value.split('/')
    if (not value.startswith('/') or value != '/' and value.endswith('/')
            or any(part in ('', '.', '..') for part in parts[1:] if value != '/')):
        raise ConfigError(f'{option}: {value!r} is not an absolute ZooKeeper path')
    refused = next((c for c in value if _refused_in_znode(c)), None)
    if refused is not None:
        raise ConfigError(f'{option}: {value!r}: ZooKeeper refuses the character U+{ord(refused):04X} '
                          'in a path')
    return value


def _refused_in_znode(character):
    """Whether ZooKeeper refuses `character` in a path: its PathUtils
    rejects NUL, most control characters (we refuse them all), UTF-16 code
    units U+D801-U+F8FE and U+FFF1-U+FFFE (so every character beyond the
    BMP, sent as surrogates)."""
    code = ord(character)
    return (unicodedata.category(character) == 'Cc' or code > 0xffff
            or 0xd800 < code < 0xf8ff or 0xfff0 < code < 0xffff)


RESERVED_ZNODE = '/zookeeper'  # ZooKeeper's own subtree (quotas, config)


def _check_reserved(zookeeper, path):
    full = (zookeeper.chroot if zookeeper else '') + (path if path != '/' else '')
    if full == RESERVED_ZNODE or full.startswith(RESERVED_ZNODE + '/'):
        raise ConfigError(f'path: {full!r} is in ZooKeeper\'s reserved {RESERVED_ZNODE} subtree')


def _host(option, value):
    host = value.strip()
    if any(character.isspace() for character in host):
        raise ConfigError(f'{option}: {value!r} is not a host name or address')
    return host


def _host_and_port(option, value):
    return _split_host_port(option, value.strip(), True)


def _text(option, value):
    return value.strip() or None


def _header_text(option, value):
    """Text that goes into an HTTP response header field (`name`: the
    Server header): printable ASCII and spaces only, a strict subset of an
    RFC 9110 5.5 field value. A line break would end the field and start
    another one; zope.server encodes headers as latin-1 and fails on
    anything beyond it."""
    text = _text(option, value)
    if text is not None and not all(' ' <= character <= '~' for character in text):
        raise ConfigError(f'{option}: {value!r} is not allowed in an HTTP header: '
                          'printable ASCII characters and spaces only')
    return text


def _absolute_path(option, value):
    return os.path.abspath(value.strip()) if value.strip() else None


def _loggers(option, value):
    """A level name (any case) or a ZConfig <logger> definition.

    ``$$(`` stands for ``%(`` because PasteDeploy's ini parser would
    otherwise try to interpolate format strings.
    """
    text = value.strip()
    if not text.startswith('<'):
        if not isinstance(logging.getLevelName(text.upper()), int):
            raise ConfigError(f'{option}: {value!r} is neither a level name nor a ZConfig logger definition')
        return text.upper()
    text = text.replace('$$(', '%(')
    try:
        _parse_zconfig_loggers(text)
    except Exception as error:  # ZConfig raises several unrelated types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f'{option}: not a valid ZConfig logger definition: {first_line}') from None
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


def _zservertracelog(option, value):
    enabled = _boolean(option, value)
    if enabled and not _installed('zc.zservertracelog'):
        raise ConfigError(
            f'{option}: true, but zc.zservertracelog is not installed '
            "(pip install 'zkprefork[tracelog]')")
    return enabled


def _readable_file(option, value):
    path = os.path.abspath(value.strip())
    if not os.access(path, os.R_OK) or not os.path.isfile(path):
        raise ConfigError(f'{option}: {value!r} is not a readable file')
    return path


# The secret is the registrar's to read (zksecurity.read_credentials checks
# its form there): the master, whose memory every worker inherits, only
# checks that there is something to read.

def _credentials_file(option, value):
    path = _readable_file(option, value)
    if os.path.getsize(path) == 0:
        raise ConfigError(f'{option}: {value!r} is empty (it must hold user:password)')
    return path


def _credentials_env(option, value):
    name = value.strip()
    if not os.environ.get(name, '').strip():
        raise ConfigError(f'{option}: {value!r} is not set in the environment '
                          '(it must hold user:password)')
    return name


def _access_log(option, value):
    value = value.strip()
    if value in ('', '-'):
        return value or None
    path = os.path.abspath(value)
    if not os.access(os.path.dirname(path), os.W_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ConfigError(f'{option}: {value!r} is not writable')
    return path


def _tls_version(option, value):
    """TLSv1.2 or TLSv1.3; the versions RFC 8996 deprecates are refused by name."""
    value = value.strip()
    if value.lower() in ('tlsv1', 'tlsv1.0', 'tlsv1.1', 'sslv3'):
        raise ConfigError(f'{option}: {value} is not accepted (RFC 8996 deprecates TLS 1.0 and '
                          '1.1): TLSv1.2 or TLSv1.3')
    for name in tls.MINIMUM_VERSIONS:
        if value.lower() == name.lower():
            return name
    raise ConfigError(f'{option}: {value!r} is not one of {", ".join(tls.MINIMUM_VERSIONS)}')


def _choice(*choices):
    """A check of one of `choices`, in any case."""
    def check(option, value):
        value = value.strip().lower()
        if value not in choices:
            raise ConfigError(f'{option}: {value!r} is not one of {", ".join(choices)}')
        return value
    return check


def _node_format(option, value):
    return _choice(*FORMATS)(option, value)


def _properties(option, value):
    """`key = value` pairs, one per line."""
    pairs = []
    for item in value.strip().splitlines():
        if not item.strip():
            continue
        key, equals, val = item.partition('=')
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f'{option}: {item.strip()!r} is not of the form key = value')
        if key in RESERVED_KEYS:
            raise ConfigError(f'{option}: {key!r} is reserved for zkprefork\'s own node data')
        pairs.append((key, val.strip()))
    return tuple(pairs)


def _request_path(option, value):
    value = value.strip()
    if not value:
        return None
    if not value.startswith('/') or any(c.isspace() or ord(c) < 32 for c in value):
        raise ConfigError(f'{option}: {value!r} is not a request path (such as /healthz)')
    return value


def option(default, check, restart_only=False, *, flag=None, http=False):
    """A Settings field that is a user option: `check(option, raw string)`
    returns the checked value or raises ConfigError; a reload cannot change
    a `restart_only` option (it is the socket, the session or the master's
    own set-up): a HUP that changes one keeps the old value and says so.
    `flag` = (METAVAR, help) makes it a command-line flag too (the default
    is appended to the help); `http` marks an option the worker's HTTP
    layer reads (zkprefork.worker.httprequest.HTTPOptions)."""
    return dataclasses.field(default=default, metadata={
        'check': check, 'restart_only': restart_only, 'flag': flag, 'http': http})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the master, its workers and the registrar need to know."""

    config_file: str = None
    app_name: str = 'main'
    zookeeper: ConnectionString = option(None, _zookeeper, restart_only=True, flag=(
        'CONN', 'ZooKeeper connection string HOST:PORT[,...][/chroot]'))
    path: str = option(None, _znode_path, restart_only=True, flag=(
        'PATH', 'ZooKeeper path under which the server registers'))
    host: str = option('', _host, restart_only=True, flag=(
        'H', "address to listen on ('' = all interfaces)"))
    port: int = option(0, _integer(0, 65535), restart_only=True, flag=(
        'P', 'port to listen on (0: the OS picks one)'))
    threads: int = option(1, _integer(1, 10000), flag=('N', 'threads per worker'))
    workers: int = option(1, _integer(1, 1000), flag=('N', 'number of worker processes'))
    # milliseconds, as zc.zkzopeserver documents
    session_timeout: int = option(10000, _integer(1), restart_only=True)
    monitor_server: tuple = option(None, _host_and_port, restart_only=True)  # (host, port)
    loggers: str = option(None, _loggers, restart_only=True)
    zservertracelog: bool = option(False, _zservertracelog)
    name: str = option(None, _header_text)  # in the Server response header
    graceful_timeout: float = option(30.0, _seconds)
    pidfile: str = option(None, _absolute_path, restart_only=True, flag=(
        'FILE', 'write the master pid to FILE'))
    boot_timeout: float = option(30.0, _positive_seconds)
    timeout: float = option(30.0, _seconds)  # heartbeat; 0 = off
    max_requests: int = option(0, _integer(0))  # 0 = never recycle
    max_requests_jitter: int = option(0, _integer(0))
    max_memory: int = option(0, _integer(0))  # MB of resident memory; 0 = no limit
    request_timeout: float = option(0.0, _seconds)  # seconds a request may run; 0 = no limit
    preload: bool = option(False, _boolean, restart_only=True)
    access_log: str = option(None, _access_log, restart_only=True)  # a file, or '-' for stdout
    # A file, or an environment variable, holding user:password.
    zookeeper_credentials_file: str = option(None, _credentials_file, restart_only=True)
    zookeeper_credentials_env: str = option(None, _credentials_env, restart_only=True)
    # How credentials are used: digest or sasl.
    zookeeper_auth: str = option('digest', _choice('digest', 'sasl'), restart_only=True)
    zookeeper_ca_file: str = option(None, _readable_file, restart_only=True)  # TLS is on when set
    zookeeper_cert_file: str = option(None, _readable_file, restart_only=True)
    zookeeper_key_file: str = option(None, _readable_file, restart_only=True)
    zookeeper_check_hostname: bool = option(True, _boolean, restart_only=True)
    node_format: str = option('zk', _node_format, restart_only=True)
    # ((key, value), ...) added to the node data
    properties: tuple = option((), _properties, restart_only=True)
    # HTTP (worker.httprequest.HTTPOptions; gunicorn's names where they match)
    limit_request_line: int = option(4094, _integer(64, 1 << 20), http=True)  # bytes -> 414
    limit_request_fields: int = option(200, _integer(1, 32768), http=True)  # header fields -> 431
    # bytes of one field, name and value -> 431
    limit_request_field_size: int = option(65536, _integer(64, 1 << 24), http=True)
    # bytes of the request line and header fields -> 431
    limit_request_header_size: int = option(262144, _integer(256, 1 << 26), http=True)
    max_request_body_size: int = option(1 << 30, _integer(0), http=True)  # bytes (1 GiB), de-chunked -> 413
    # seconds for the headers, and of silence inside a body -> 408
    request_read_timeout: float = option(30.0, _positive_seconds, http=True)
    # bytes/s a body must average, after request_read_timeout -> 408
    request_body_min_rate: int = option(500, _integer(1), http=True)
    # seconds a connection may stay idle (before its first byte, between requests)
    keepalive: float = option(2.0, _positive_seconds, http=True)
    # bytes of response buffered before the application waits
    outbuf_high_watermark: int = option(4 << 20, _integer(65536), http=True)
    # seconds a client may read nothing of a response before it is dropped
    send_timeout: float = option(60.0, _positive_seconds, http=True)
    # networks trusted for X-Forwarded-*, or ('*',)
    forwarded_allow_ips: tuple = option(('127.0.0.1/32',), _forwarded_allow_ips, http=True)
    # TLS on the listening socket (gunicorn's names; on when certfile is set)
    certfile: str = option(None, _readable_file, flag=('FILE', 'serve HTTPS: the certificate chain (PEM)'))
    keyfile: str = option(None, _readable_file, flag=('FILE', "the certificate's private key (PEM)"))
    keyfile_password_file: str = option(None, _readable_file)  # the key's password, if encrypted
    ca_certs: str = option(None, _readable_file, flag=('FILE', 'CAs that sign client certificates (PEM)'))
    # none, optional or required; default: required with ca_certs, else none
    cert_reqs: str = option(None, _choice(*tls.CERT_REQS), flag=(
        'REQS', 'client certificates: none, optional or required'))
    ciphers: str = option(None, _text, flag=('LIST', 'OpenSSL cipher list for TLS 1.2'))
    tls_minimum_version: str = option('TLSv1.2', _tls_version)
    # Health-gated registration, in HAProxy's terms and with its defaults
    # (inter 2 s, rise 2, fall 3; timeout: the interval, as `timeout check`).
    health_check: str = option(None, _request_path, restart_only=True)  # a path; None: off
    health_check_interval: float = option(2.0, _positive_seconds, restart_only=True)
    health_check_timeout: float = option(None, _positive_seconds, restart_only=True)
    health_check_rise: int = option(2, _integer(1, 1000), restart_only=True)
    health_check_fall: int = option(3, _integer(1, 1000), restart_only=True)
    # The client certificate the check presents to a server that asks for
    # one (cert_reqs optional or required); default: the server's own.
    health_check_certfile: str = option(None, _readable_file, restart_only=True)
    health_check_keyfile: str = option(None, _readable_file, restart_only=True)
    health_check_keyfile_password_file: str = option(None, _readable_file, restart_only=True)

    def __post_init__(self):
        # Made directly (as tests do) rather than by make_settings: the
        # connection string still arrives parsed downstream.
        if self.zookeeper is not None and not isinstance(self.zookeeper, ConnectionString):
            object.__setattr__(self, 'zookeeper', ConnectionString(self.zookeeper))

    @property
    def registers(self):
        """True if the server registers in ZooKeeper (`zookeeper` is set)."""
        return self.zookeeper is not None

    @property
    def health_check_identity(self):
        """(certfile, keyfile, keyfile_password_file) that the health check
        presents over TLS (keyfile and password file may be None), or None
        when the server asks no client certificate."""
        if self.health_check_certfile:
            return (self.health_check_certfile, self.health_check_keyfile,
                    self.health_check_keyfile_password_file)
        if self.tls and self.cert_reqs in ('optional', 'required'):
            return self.certfile, self.keyfile, self.keyfile_password_file
        return None

    @property
    def tls(self):
        return self.certfile is not None

    @property
    def scheme(self):
        return 'https' if self.tls else 'http'


_CHECKS = {field.name: field.metadata['check'] for field in dataclasses.fields(Settings)
           if 'check' in field.metadata}
OPTIONS = tuple(_CHECKS)
RESTART_ONLY = tuple(field.name for field in dataclasses.fields(Settings)
                     if field.metadata.get('restart_only'))
# Settings fields, in declaration order.
COMMAND_LINE = tuple(field for field in dataclasses.fields(Settings) if field.metadata.get('flag'))
HTTP = tuple(field for field in dataclasses.fields(Settings) if field.metadata.get('http'))


def _check_together(checked):
    """What no option's value says on its own."""
    if checked.get('zookeeper') and not checked.get('path'):
        raise ConfigError('path: required when zookeeper is set')
    if checked.get('path'):
        _check_reserved(checked.get('zookeeper'), checked['path'])
    if checked.get('zookeeper_credentials_file') and checked.get('zookeeper_credentials_env'):
        raise ConfigError('zookeeper_credentials_env: give credentials in a file or in the '
                          'environment, not both')
    if bool(checked.get('zookeeper_cert_file')) != bool(checked.get('zookeeper_key_file')):
        raise ConfigError('zookeeper_cert_file: a client certificate needs zookeeper_key_file too')
    # TLS is on only with a CA file: without one these would silently do nothing.
    tls_only = [name for name in ('zookeeper_cert_file', 'zookeeper_key_file', 'zookeeper_check_hostname')
                if name in checked]
    if tls_only and not checked.get('zookeeper_ca_file'):
        raise ConfigError(f'{tls_only[0]}: TLS needs zookeeper_ca_file (without it the '
                          'connection to ZooKeeper is not encrypted)')
    health = [name for name in checked if name.startswith('health_check')]
    if health and not checked.get('zookeeper'):
        raise ConfigError(f'{health[0]}: the health check decides the registration: it needs '
                          'zookeeper')
    if checked.get('zookeeper_auth') == 'sasl' and not _installed('puresasl'):
        raise ConfigError("zookeeper_auth: sasl needs the pure-sasl package "
                          "(pip install 'zkprefork[sasl]')")


# Options that mean nothing without certfile.
_TLS_ONLY = ('keyfile', 'keyfile_password_file', 'ca_certs', 'cert_reqs', 'ciphers',
             'tls_minimum_version')


def _check_tls(checked):
    """The TLS options together; then the files themselves, loaded the way
    a worker will (tls.server_context), so that a bad one is an error now."""
    if not checked.get('certfile'):
        given = [name for name in _TLS_ONLY + _HEALTH_CHECK_TLS if name in checked]
        if given:
            raise ConfigError(f'{given[0]}: TLS needs certfile (the server certificate)')
        return
    checked.setdefault('cert_reqs', 'required' if checked.get('ca_certs') else 'none')
    if checked['cert_reqs'] != 'none' and not checked.get('ca_certs'):
        raise ConfigError(f'cert_reqs: {checked["cert_reqs"]} needs ca_certs (the CAs that sign '
                          'client certificates)')
    given = [name for name in _HEALTH_CHECK_TLS if name in checked]
    if given and checked['cert_reqs'] == 'none':
        raise ConfigError(f'{given[0]}: the server asks no client certificate (cert_reqs none): '
                          'the health check would present none')
    if given and 'health_check_certfile' not in checked:
        raise ConfigError(f'{given[0]}: needs health_check_certfile (the certificate it goes with)')


# The health check's client certificate: only a server asking for one reads it.
_HEALTH_CHECK_TLS = ('health_check_certfile', 'health_check_keyfile',
                     'health_check_keyfile_password_file')


def _check_health_check_accepted(settings, server):
    """The client certificate the health check would present, offered to
    `server` (the server's own SSLContext) in a handshake in memory: one
    the server refuses is an error now, not a node that never registers."""
    if not (settings.health_check and settings.health_check_identity):
        return
    own = not settings.health_check_certfile
    client = tls.client_context(*settings.health_check_identity, prefix='' if own else 'health_check_')
    refusal = tls.handshake_refusal(server, client)
    if refusal and own:
        raise ConfigError(f'health_check: the server refuses its own certificate '
                          f'{settings.certfile!r} as the check\'s client certificate ({refusal}, '
                          f'ca_certs {settings.ca_certs!r}): give one in health_check_certfile')
    if refusal:
        raise ConfigError(f'health_check_certfile: {settings.health_check_certfile!r}: the server '
                          f'refuses it as a client certificate ({refusal}, ca_certs '
                          f'{settings.ca_certs!r})')


def make_settings(options, **fixed):
    """Check raw option strings (ini and command line merged) into Settings.

    `fixed` carries values that are not user options in the server section
    (the config file, the app name).
    """
    unknown = sorted(set(options) - set(_CHECKS))
    if unknown:
        raise ConfigError(f'{unknown[0]}: unknown option (known options: {", ".join(sorted(OPTIONS))})')
    checked = {name: _CHECKS[name](name, value) for name, value in options.items()
               if value is not None}
    _check_together(checked)
    _check_tls(checked)
    settings = Settings(**fixed, **checked)
    if settings.tls:
        _check_health_check_accepted(settings, tls.server_context(settings))
    if settings.zookeeper_ca_file:
        zookeeper_tls.client_context(settings.zookeeper_ca_file, settings.zookeeper_cert_file,
                                     settings.zookeeper_key_file, settings.zookeeper_check_hostname)
    return settings
