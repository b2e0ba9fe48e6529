"""TLS on the listening socket: the server's SSLContext, made from the
Settings' certfile, keyfile, keyfile_password_file, ca_certs, cert_reqs,
ciphers and tls_minimum_version (gunicorn's names; mod_ssl's for what the
environ says), and what the certificate says of itself.

The master makes it at start and on every reload before a worker is
replaced, so that a file that fails to load is one ConfigError naming the
file and the reason (exit 2 at start; the reload halts, the running
workers keep serving); the workers it forks then serve with that very
context, and so share its session ticket keys. OpenSSL does the
protocol (the standard library's ssl): renegotiation is refused, ALPN
offers http/1.1 only, TLS 1.0 and 1.1 are never accepted.
"""
import ssl
import time

from zkprefork.errors import ConfigError

CERT_REQS = {'none': ssl.CERT_NONE, 'optional': ssl.CERT_OPTIONAL, 'required': ssl.CERT_REQUIRED}
MINIMUM_VERSIONS = {'TLSv1.2': ssl.TLSVersion.TLSv1_2, 'TLSv1.3': ssl.TLSVersion.TLSv1_3}
ALPN = ['http/1.1']
# Why TLS handshakes failed, as the worker counts them (the metric's reason label).
HANDSHAKE_FAILURES = ('protocol', 'http_request', 'certificate', 'closed', 'timeout', 'other')
# A password file holds one line; more would be a mistake of the operator's.
MAX_PASSWORD_BYTES = 4096


def server_context(settings):
    """The SSLContext that serves `settings` (a Settings with certfile set).

    Raises ConfigError, in one line naming the option, the file and
    OpenSSL's reason, for a file that is missing, unreadable or not PEM, a
    key that does not match the certificate or whose password is wrong, a
    certificate already expired or not yet valid, CAs that do not load, and
    ciphers OpenSSL does not know."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSIONS[settings.tls_minimum_version]
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(ALPN)
    if settings.ciphers:
        _set_ciphers(context, settings.ciphers)
    check_validity(settings.certfile)
    _load_key(context, settings.certfile, settings.keyfile, settings.keyfile_password_file)
    if settings.ca_certs:
        try:
            context.load_verify_locations(settings.ca_certs)
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(f'ca_certs: {settings.ca_certs!r}: no CA certificate loads '
                              f'({_reason(error)})') from None
    context.verify_mode = CERT_REQS[settings.cert_reqs]
    return context


def _set_ciphers(context, ciphers):
    """`ciphers` (OpenSSL's cipher list) on `context`; ConfigError if it
    selects nothing, or a suite that authenticates no server (aNULL) or
    encrypts nothing (eNULL): OpenSSL takes them when asked, and an
    operator's ``ALL:@SECLEVEL=0`` would serve pages in the clear."""
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise ConfigError(f'ciphers: OpenSSL selects no cipher from {ciphers!r}') from None
    unsafe = [suite['name'] for suite in context.get_ciphers()
              if suite['auth'] == 'auth-null' or suite['symmetric'] is None]
    if unsafe:
        raise ConfigError(f'ciphers: {ciphers!r} selects suites without server authentication or '
                          f'encryption ({", ".join(unsafe[:3])}{", ..." if len(unsafe) > 3 else ""}): '
                          f'add :!aNULL:!eNULL')


def _load_key(context, certfile, keyfile, password_file, prefix=''):
    """Load certificate chain and key into `context`; errors name the
    options `prefix` + certfile, keyfile, keyfile_password_file."""
    password = _password(password_file, prefix)
    keyfile_named = keyfile or certfile  # the key may follow the chain in certfile

    def no_password():
        # Called only for an encrypted key; OpenSSL would prompt on the terminal.
        raise ConfigError(f'{prefix}keyfile: {keyfile_named!r} is encrypted: give its password in '
                          f'{prefix}keyfile_password_file')
    try:
        context.load_cert_chain(certfile, keyfile, password=password or no_password)
    except (ssl.SSLError, OSError) as error:
        reason = _reason(error, prefix)
        if password and reason == 'no PEM private key here':
            reason = f'wrong password ({prefix}keyfile_password_file), or no PEM private key here'
        raise ConfigError(f'{prefix}keyfile: {keyfile_named!r}: {reason}') from None


def _reason(error, prefix=''):
    """OpenSSL's reason in words, or the OS's; options named with `prefix`."""
    reason = getattr(error, 'reason', None)
    known = {'KEY_VALUES_MISMATCH': f'the key does not match the certificate ({prefix}certfile)',
             'BAD_DECRYPT': f'wrong password for the key ({prefix}keyfile_password_file)',
             'PEM_LIB': 'no PEM private key here',
             'NO_CIPHER_MATCH': 'no cipher matches'}
    if reason in known:
        return known[reason]
    if isinstance(error, ssl.SSLError) and 'PEM lib' in str(error):
        return known['PEM_LIB']
    return reason or getattr(error, 'strerror', None) or str(error.args[0] if error.args else error)


def _password(path, prefix=''):
    """The key's password, read from its file (never from the ini, a log
    or a command line); None without one."""
    if not path:
        return None
    try:
        with open(path, 'rb') as file:
            secret = file.read(MAX_PASSWORD_BYTES + 1)
    except OSError as error:
        raise ConfigError(f'{prefix}keyfile_password_file: {path!r}: {error.strerror}') from None
    if len(secret) > MAX_PASSWORD_BYTES or not secret.strip():
        raise ConfigError(f'{prefix}keyfile_password_file: {path!r} must hold the password, '
                          f'one line of at most {MAX_PASSWORD_BYTES} bytes')
    return secret.rstrip(b'\r\n')


def client_context(certfile=None, keyfile=None, password_file=None, prefix='health_check_'):
    """The health check's SSLContext: TLS 1.2 or later, ALPN http/1.1, and
    with `certfile` a client certificate (`keyfile`, `password_file` as
    the server's own options; errors name `prefix` + the option).

    The server's certificate is NOT verified: the checker connects to its
    own server, on a local address (the one it registers, or loopback),
    with no network in between; there is no name to check it against, and
    a check asks whether the server answers over TLS and HTTP, not who it
    is. Raises ConfigError as server_context does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    if certfile:
        certificate(certfile, prefix + 'certfile')  # else OpenSSL blames the key
        _load_key(context, certfile, keyfile, password_file, prefix)
    return context


def handshake_refusal(server, client, rounds=10):
    """Why SSLContext `server` refuses a handshake from SSLContext `client`
    (a few words, OpenSSL's), or None when it is accepted: a real
    handshake, in memory (ssl.MemoryBIO), with nothing on the network."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    # Client first: in TLS 1.3 the client finishes before the server has
    # checked the client's certificate, so the server's verdict comes last.
    sides = [client.wrap_bio(to_client, to_server),
             server.wrap_bio(to_server, to_client, server_side=True)]
    finished = [False, False]
    for _ in range(rounds):
        for index, side in enumerate(sides):
            if finished[index]:
                continue
            try:
                side.do_handshake()
                finished[index] = True
            except ssl.SSLWantReadError:
                pass  # its peer's turn
            except ssl.SSLError as error:
                return _handshake_reason(error)
        if all(finished):
            return None
    return 'the handshake did not finish'


def _handshake_reason(error):
    verified = getattr(error, 'verify_message', None)
    if verified:
        return verified
    return (error.reason or str(error)).replace('_', ' ').lower()


def certificate(path, option='certfile'):
    """What the first certificate of PEM file `path` says: {'subject':
    RFC 4514 string, 'issuer': ..., 'not_before', 'not_after': seconds since
    the epoch}. Raises ConfigError (naming `option`) if it cannot be read."""
    try:
        # The standard library's own decoder (its tests', stable since 2.7):
        # the public API decodes only a peer's certificate.
        decoded = ssl._ssl._test_decode_cert(path)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f'{option}: {path!r}: {_reason(error)}') from None
    return {'subject': rfc4514(decoded.get('subject', ())),
            'issuer': rfc4514(decoded.get('issuer', ())),
            'not_before': ssl.cert_time_to_seconds(decoded['notBefore']),
            'not_after': ssl.cert_time_to_seconds(decoded['notAfter'])}


def check_validity(path, now=None):
    """ConfigError unless the certificate of `path` is valid at `now`
    (wall-clock seconds: validity is a date, not a duration)."""
    now = time.time() if now is None else now
    found = certificate(path)
    if now >= found['not_after']:
        raise ConfigError(f'certfile: {path!r}: the certificate expired on '
                          f'{_date(found["not_after"])}')
    if now < found['not_before']:
        raise ConfigError(f'certfile: {path!r}: the certificate is not valid before '
                          f'{_date(found["not_before"])}')
    return found


def _date(seconds):
    return time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(seconds))


# RFC 4514 2.3 short names; others are written as their dotted OID by
# OpenSSL already, or by the long name the ssl module gives.
_SHORT_NAMES = {'commonName': 'CN', 'countryName': 'C', 'localityName': 'L',
                'stateOrProvinceName': 'ST', 'organizationName': 'O',
                'organizationalUnitName': 'OU', 'streetAddress': 'STREET',
                'domainComponent': 'DC', 'userId': 'UID'}


def rfc4514(name):
    """A distinguished name as the ssl module decodes it (a tuple of RDNs,
    each a tuple of (type, value)) -> its RFC 4514 string, most specific
    RDN first (RFC 4514 2.1), values escaped (2.4)."""
    rdns = ['+'.join(f'{_SHORT_NAMES.get(kind, kind)}={_escape(value)}' for kind, value in rdn)
            for rdn in name]
    return ','.join(reversed(rdns))


def _escape(value):
    escaped = ''.join('\\' + char if char in '"+,;<>\\' else char for char in value)
    if escaped[:1] in ('#', ' '):
        escaped = '\\' + escaped
    if escaped.endswith(' ') and not escaped.endswith('\\ '):
        escaped = escaped[:-1] + '\\ '
    return escaped.replace('\0', '\\00')
