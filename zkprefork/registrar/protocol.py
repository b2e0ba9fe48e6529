"""The master<->registrar protocol: JSON lines over the registrar's pipes.

The one definition both ends use (registrar_link.py writes commands and
reads events, registrar.py the reverse). Pure: it imports neither kazoo nor
the master, so that each end may import it.

On the registrar's stdin, first its configuration (a RegistrarConfig), then
commands::

    {"op": "register", "endpoints": [[host, port], ...], "data": {...}}
    {"op": "unregister"}
    {"op": "hand_over"}
    {"op": "own"}
    {"op": "ping", "seq": 7}

On its stdout, events::

    {"event": "state", "state": "connected", "session": "0x10000a2b3c0001",
     "nodes": ["/svc/127.0.0.1:8080"], "since": 1700000000.123, "problems": [],
     "error": null, "health": null}
    {"event": "unregistered"}
    {"event": "session", "id": 72057594037927937, "password": "0a1b..."}
    {"event": "pong", "seq": 7}

The user's secrets never travel here: the configuration names the file or
environment variable that holds them (CredentialsSource, with the master's
inherited fd of the file), and the registrar reads it. Two secrets of the master's own do, and nowhere else (never in a
log, a command line, the monitor or a repr): the digest identity it made up
at start for its registrars (`identity`, when the user gave no credentials),
and the session of its last registrar (`resume`), which the next one takes
back, so that the nodes it holds stay as they are (`health_up` carries the
last health check state over too).
"""
import dataclasses
import json
import secrets
import typing

from zkprefork import addresses

# The registrar's states, as events report them (see registrar.py).
STATES = ('connecting', 'connected', 'suspended', 'lost', 'failed')


class ProtocolError(ValueError):
    """A line that is not a message of this protocol."""


def _line(**message):
    return json.dumps(message) + '\n'


def _load(line):
    try:
        message = json.loads(line)
    except ValueError as error:
        raise ProtocolError(f'not a JSON line: {error}') from None
    if not isinstance(message, dict):
        raise ProtocolError(f'not a JSON object: {line!r}')
    return message


# -- commands (master -> registrar) -------------------------------------------

class Register(typing.NamedTuple):
    """Register every (host, port) endpoint with zkprefork's node data."""
    endpoints: tuple  # ((host, port), ...)
    data: dict  # pid, instance, workers, generation, monitor

    def line(self):
        return _line(op='register', endpoints=[list(e) for e in self.endpoints], data=self.data)


class Unregister(typing.NamedTuple):
    """Delete every node this registrar made; answered by Unregistered."""

    def line(self):
        return _line(op='unregister')


class HandOver(typing.NamedTuple):
    """A live upgrade (master/upgrade.py): stop touching ZooKeeper and exit
    WITHOUT closing the session, whose nodes the new master's registrar
    takes over by resuming it. No answer: the exit is the answer."""

    def line(self):
        return _line(op='hand_over')


class Own(typing.NamedTuple):
    """To a registrar started `handed_over`: the upgrade is done, leaving
    closes the session again (as any registrar's)."""

    def line(self):
        return _line(op='own')


class Ping(typing.NamedTuple):
    """Answered by a Pong of the same `seq` from the registrar's loop (never
    from a thread of its own): an answer says that the loop still runs, so
    that what it last reported still holds (master/heartbeat.py)."""
    seq: int

    def line(self):
        return _line(op='ping', seq=self.seq)


_PLAIN_COMMANDS = {'unregister': Unregister, 'hand_over': HandOver, 'own': Own}


def read_command(line):
    """A command line -> Register, Unregister, HandOver, Own or Ping;
    ProtocolError otherwise."""
    message = _load(line)
    op = message.get('op')
    if op == 'ping':
        if type(message.get('seq')) is not int:
            raise ProtocolError(f'ping: no integer seq in {line!r}')
        return Ping(message['seq'])
    if op == 'register':
        try:
            endpoints = tuple((str(host), int(port)) for host, port in message['endpoints'])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f'register: bad endpoints in {line!r}') from None
        if not isinstance(message.get('data'), dict):
            raise ProtocolError(f'register: no data object in {line!r}')
        return Register(endpoints, message['data'])
    if op in _PLAIN_COMMANDS:
        return _PLAIN_COMMANDS[op]()
    raise ProtocolError(f'unknown command {op!r}')


# -- events (registrar -> master) ------------------------------------------------

class State(typing.NamedTuple):
    """Every field, every time: the master keeps the last value of each."""
    state: str  # one of STATES
    session: str  # '0x...', or None without a session
    nodes: list  # full paths (chroot included) owned by the current session
    since: float  # when `state` last changed, seconds since the epoch
    problems: list  # registrations held back, one line each
    error: str  # why the state is 'failed', or None
    health: dict  # the health check's state and counts (healthcheck.Health.status), or None

    def line(self):
        return _line(event='state', **self._asdict())


class Unregistered(typing.NamedTuple):
    """The answer to Unregister: the nodes are deleted (or go with the session)."""

    def line(self):
        return _line(event='unregistered')


class SessionHeld(typing.NamedTuple):
    """The session the registrar holds now: a registrar that replaces it
    resumes it (its nodes stay, with their names and czxids)."""
    id: int
    password: str  # hexadecimal

    def line(self):
        return _line(event='session', **self._asdict())

    def __repr__(self):
        return f'SessionHeld(id=0x{self.id:x})'


class Pong(typing.NamedTuple):
    """The answer to Ping."""
    seq: int

    def line(self):
        return _line(event='pong', seq=self.seq)


_EVENTS = {'state': State, 'unregistered': Unregistered, 'session': SessionHeld, 'pong': Pong}


def read_event(line):
    """An event line -> {'event': name, **fields} (the master keeps plain
    dicts); ProtocolError for anything else."""
    message = _load(line)
    name = message.pop('event', None)
    if name not in _EVENTS:
        raise ProtocolError(f'unknown event {name!r}')
    try:
        event = _EVENTS[name](**message)
    except TypeError as error:
        raise ProtocolError(f'{name}: {error}') from None
    if name == 'state' and event.state not in STATES:
        raise ProtocolError(f'state: unknown state {event.state!r}')
    return {'event': name, **event._asdict()}


# -- the configuration (the first line) -------------------------------------------

def make_identity():
    """A random digest identity, 'user:password', for a master's registrars
    when the user configured no credentials: only they may write its nodes."""
    return f'zkprefork-{secrets.token_hex(6)}:{secrets.token_urlsafe(24)}'


# No defaults below: Settings holds them, and from_settings copies them.

@dataclasses.dataclass(frozen=True)
class CredentialsSource:
    """Where the registrar reads user:password; never the secret itself."""
    file: str  # a file holding user:password, or None
    env: str  # or the name of an environment variable holding it
    scheme: str  # 'digest' or 'sasl'
    # Not an option: the master's fd of `file`, opened when it last
    # validated the settings and inherited by the registrar, which reads the
    # secret from it (a file deleted or replaced since changes nothing); or
    # None: the registrar opens `file` itself.
    fd: int = None


@dataclasses.dataclass(frozen=True)
class TLSOptions:
    ca_file: str  # PEM CA bundle; TLS is on when this is set
    cert_file: str  # client certificate (PEM) and its key, or None
    key_file: str
    check_hostname: bool


@dataclasses.dataclass(frozen=True)
class HealthCheckOptions:
    path: str  # requested with GET; a 2xx passes
    host: str  # the address to request it from, or None: the first registered host
    interval: float  # seconds between checks
    timeout: float  # seconds a check may take
    rise: int  # passes in a row that make a server UP
    fall: int  # failures in a row that make it DOWN
    tls: bool = False  # the server speaks TLS: so does the check
    # The client certificate (PEM) it presents, key and key's password
    # file (paths, or None): Settings.health_check_identity.
    certfile: str = None
    keyfile: str = None
    keyfile_password_file: str = None

    @classmethod
    def from_settings(cls, settings):
        if not settings.health_check:
            return None
        # Through the real listening socket: a wildcard is reached on loopback.
        host = addresses.reachable_host(settings.host)
        identity = settings.health_check_identity or (None, None, None)
        return cls(settings.health_check, host, settings.health_check_interval,
                   settings.health_check_timeout or settings.health_check_interval,
                   settings.health_check_rise, settings.health_check_fall, settings.tls, *identity)


@dataclasses.dataclass(frozen=True)
class RegistrarConfig:
    """What the registrar needs of Settings, checked there already."""
    hosts: str  # kazoo's hosts string, without the chroot
    addresses: tuple  # ((host, port), ...): the servers of `hosts`
    chroot: str  # '' or '/chroot': created like any other missing parent
    path: str  # the service path, under the chroot
    session_timeout: int  # milliseconds
    node_format: str  # one of nodeformat.FORMATS
    properties: tuple  # ((key, value), ...)
    loggers: str  # the loggers option, or None
    credentials: CredentialsSource  # or None
    tls: TLSOptions  # or None: no TLS
    health: HealthCheckOptions  # or None: registered whenever the workers are ready
    # Not options, the master's own (see above): defaults of their own.
    identity: str = dataclasses.field(default=None, repr=False)  # 'user:password', or None
    resume: tuple = dataclasses.field(default=None, repr=False)  # (session id, password hex), or None
    # The last registrar's health check said UP: the next one starts UP (as
    # HAProxy's server-state-file keeps states across reloads), so that the
    # node of the resumed session stays.
    health_up: bool = False
    # `resume` came from the old master of a live upgrade: until an Own
    # command, every way out leaves the session open, so that the old
    # master can take it (and its nodes) back if this master fails.
    handed_over: bool = False

    @classmethod
    def from_settings(cls, settings, identity=None, resume=None, health_up=False, handed_over=False,
                      credentials_fd=None):
        """`credentials_fd`: see CredentialsSource.fd."""
        servers = settings.zookeeper  # a settings.ConnectionString, parsed there
        credentials = tls = None
        if settings.zookeeper_credentials_file or settings.zookeeper_credentials_env:
            credentials = CredentialsSource(settings.zookeeper_credentials_file,
                                            settings.zookeeper_credentials_env,
                                            settings.zookeeper_auth, credentials_fd)
        if settings.zookeeper_ca_file:
            tls = TLSOptions(settings.zookeeper_ca_file, settings.zookeeper_cert_file,
                             settings.zookeeper_key_file, settings.zookeeper_check_hostname)
        return cls(servers.hosts, servers.addresses, servers.chroot, settings.path,
                   settings.session_timeout, settings.node_format, settings.properties,
                   settings.loggers, credentials, tls, HealthCheckOptions.from_settings(settings),
                   resume=resume, health_up=health_up, handed_over=handed_over,
                   identity=None if credentials else identity)

    @property
    def service_path(self):
        """The path as the registrar uses it: kazoo is given no chroot."""
        if self.path == '/':
            return self.chroot or '/'
        return self.chroot + self.path

    def line(self):
        return json.dumps(dataclasses.asdict(self)) + '\n'

    @classmethod
    def read(cls, line):
        value = _load(line)
        try:
            value['addresses'] = tuple((host, port) for host, port in value['addresses'])
            value['properties'] = tuple((key, item) for key, item in value['properties'])
            if value.get('credentials'):
                value['credentials'] = CredentialsSource(**value['credentials'])
            if value.get('tls'):
                value['tls'] = TLSOptions(**value['tls'])
            if value.get('health'):
                value['health'] = HealthCheckOptions(**value['health'])
            if value.get('resume'):
                value['resume'] = tuple(value['resume'])
            return cls(**value)
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f'not a registrar configuration: {error!r}') from None
