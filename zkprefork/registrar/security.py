"""Who the registrar is to ZooKeeper and how it reaches it safely.

Credentials (digest or SASL DIGEST-MD5) come from a file or an environment
variable, never from the command line or stdin; the ACLs that follow from
them; TLS options and a TLS check that names a failed handshake; and a log
record factory that keeps every secret out of every log line (kazoo prints
digest credentials at DEBUG and the session password at level 5).
"""
import importlib.util
import logging
import os
import re
import socket
import ssl
import typing

from kazoo.security import READ_ACL_UNSAFE, make_acl, make_digest_acl

from zkprefork import zookeeper_tls
from zkprefork.errors import ConfigError

# How long to wait after a TLS handshake for the server to refuse our
# certificate: with TLS 1.3 that refusal only arrives after the client
# considers the handshake done.
REFUSAL_WAIT = 0.5


class Credentials(typing.NamedTuple):
    user: str
    password: str
    scheme: str  # 'digest' or 'sasl'

    def __repr__(self):
        return f'Credentials(user={self.user!r}, scheme={self.scheme!r})'

    @property
    def identity(self):
        return f'{"SASL" if self.scheme == "sasl" else "digest"} user {self.user!r}'


def read_credentials(source):
    """The credentials named by `source` (a registrar_protocol.CredentialsSource:
    a file or an environment variable holding user:password), or None
    without one. Raises OSError or ValueError if they cannot be had; the
    only reader of the secret."""
    if source is None:
        return None
    if source.fd is not None:
        secret = _read_held(source.fd).strip()
    elif source.file:
        with open(source.file) as file:
            secret = file.read().strip()
    else:
        secret = os.environ.get(source.env, '').strip()
    user, colon, password = secret.partition(':')
    if not (user and colon and password):
        # The secret itself never goes into a message.
        raise ValueError(f'{source.file or source.env} does not hold credentials of the form user:password')
    return Credentials(user, password, source.scheme)


def _read_held(fd):
    """All of the file open at `fd` (the master's, master/credentials.py),
    from its start whatever its offset, as text; `fd` is closed."""
    try:
        chunks, size = [], 0
        while chunk := os.pread(fd, 65536, size):
            chunks.append(chunk)
            size += len(chunk)
        return b''.join(chunks).decode()
    finally:
        os.close(fd)


def missing_support(credentials):
    """What these credentials need that is not installed, in one line."""
    # kazoo's SASL client; without it kazoo's connection thread dies.
    if credentials and credentials.scheme == 'sasl' and importlib.util.find_spec('puresasl') is None:
        return "zookeeper_auth = sasl needs the pure-sasl package (pip install 'zkprefork[sasl]')"
    return None


def client_options(tls, credentials):
    """KazooClient keyword arguments for authentication and TLS (`tls`: a
    registrar_protocol.TLSOptions, or None)."""
    options = {}
    if credentials and credentials.scheme == 'sasl':
        options['sasl_options'] = {'mechanism': 'DIGEST-MD5', 'username': credentials.user,
                                   'password': credentials.password}
    elif credentials:
        options['auth_data'] = [('digest', f'{credentials.user}:{credentials.password}')]
    if tls:
        options.update(use_ssl=True, verify_certs=True, ca=tls.ca_file, certfile=tls.cert_file,
                       keyfile=tls.key_file, check_hostname=tls.check_hostname)
    return options


def own_credentials(identity):
    """The master's own digest identity ('user:password', made up at its
    start, see registrar_protocol.make_identity) as Credentials, or None."""
    if not identity:
        return None
    user, _, password = identity.partition(':')
    return Credentials(user, password, 'digest')


def acls(credentials, identity=None):
    """(service path ACL, node ACL). `credentials`: the user's, or None;
    `identity`: who writes the nodes without them (own_credentials).

    Everyone may read a node; only its writer (the user's identity, or this
    master's own) may change it, so that its data is set in place. ZooKeeper
    checks create and delete on the parent: with the user's credentials the
    service path is protected too (no one else deletes our node or
    registers fake siblings); without, it is open (kazoo's default), as
    other servers, each with its own identity, register there too."""
    writer = credentials or identity
    if not writer:
        return None, READ_ACL_UNSAFE
    if writer.scheme == 'sasl':
        ours = make_acl('sasl', writer.user, all=True)
    else:
        ours = make_digest_acl(writer.user, writer.password, all=True)
    acl = [make_acl('world', 'anyone', read=True), ours]
    return (acl if credentials else None), acl


def open_to_anyone(acl_list):
    """Whether `acl_list` lets anyone at all create or delete nodes."""
    return any(acl.id.scheme == 'world' and acl.id.id == 'anyone' and acl.perms & (4 | 8)
               for acl in acl_list)  # CREATE | DELETE


# -- secrets out of the logs ----------------------------------------------

# kazoo's Connect requests and responses (passwd=b'...') and its level-5
# lines (session_passwd: 0a1b...) carry the session password.
_SESSION_PASSWORD = re.compile(
    r"""(passwd(?:=|: ))(b'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*"|[0-9a-fA-F]+)""")
REDACTED = '<redacted>'


def redact(text, secrets):
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return _SESSION_PASSWORD.sub(r'\1' + REDACTED, text)


def redact_logs(credentials):
    """Clean every log record of this process as it is made, whatever
    handler, filter or ZConfig set-up later sees it."""
    secrets = []
    if credentials:
        # The longer first, so that user:password does not become user:<redacted>.
        secrets = [f'{credentials.user}:{credentials.password}', credentials.password]
    secrets = [secret for secret in secrets if secret]
    make_record = logging.getLogRecordFactory()

    def clean_record(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it later
            return record
        cleaned = redact(message, secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), secrets)
        return record
    logging.setLogRecordFactory(clean_record)


# -- TLS --------------------------------------------------------------------

def tls_context(tls):
    """The context kazoo builds from the same options (kazoo.handlers.utils).
    Raises ConfigError (one line, naming the option) for a file that does
    not load."""
    return zookeeper_tls.client_context(tls.ca_file, tls.cert_file, tls.key_file, tls.check_hostname)


def tls_files_problem(tls):
    """Why the TLS files do not load, in one line naming the option, or
    None. Read anew each time: they were good at the master's start, but
    may have changed since (a registrar restarted later reads them again)."""
    try:
        tls_context(tls)
    except ConfigError as error:
        return str(error)
    return None


def tls_problem(addresses, tls, timeout=2.0):
    """Why no TLS session with ZooKeeper can be had, in one line: the
    files' problem (tls_files_problem), or a failed handshake's; None when
    a server completes the handshake or none answers at all (that is not a
    TLS problem: ZooKeeper is down)."""
    try:
        context = tls_context(tls)
    except ConfigError as error:
        return str(error)
    problems = []
    for host, port in addresses:
        try:
            sock = socket.create_connection((host, port), timeout)
        except OSError:
            continue
        problem = _handshake_problem(context, sock, host)
        if problem is None:
            return None
        problems.append(f'{host}:{port}: {problem}')
    return '; '.join(problems) or None


def _handshake_problem(context, sock, host):
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.settimeout(REFUSAL_WAIT)
            try:
                if tls.recv(1) == b'':
                    return 'the server closed the connection right after the handshake'
            except socket.timeout:
                pass  # the server waits for our request: all is well
        return None
    except ssl.SSLCertVerificationError as error:
        return f'the server certificate is not accepted: {error.verify_message}'
    except ssl.SSLError as error:
        return _describe_ssl_error(error)
    except OSError as error:
        return f'the connection failed during the handshake: {error}'
    finally:
        sock.close()


def _describe_ssl_error(error):
    reason = error.reason or str(error)
    if 'ALERT' in reason and 'CERTIFICATE' in reason:
        return f'the server refused our client certificate ({reason})'
    if reason in ('UNEXPECTED_EOF_WHILE_READING', 'WRONG_VERSION_NUMBER', 'RECORD_LAYER_FAILURE'):
        return f'no TLS on that port ({reason})'
    return reason
