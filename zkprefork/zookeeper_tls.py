"""The TLS context of a client of ZooKeeper, made from the options
zookeeper_ca_file, zookeeper_cert_file, zookeeper_key_file and
zookeeper_check_hostname the way kazoo makes its own
(kazoo.handlers.utils.create_tcp_connection, at every connection attempt).

Settings loads it at start and on every reload, so that a file that does not
load is one ConfigError naming the option, the file and the reason (exit 2
at start); the registrar loads it again before it connects and in its TLS
check, as a file may have changed since (kazoo would only retry for ever).
"""
import ssl

from zkprefork.errors import ConfigError


def client_context(ca_file, cert_file=None, key_file=None, check_hostname=True):
    """The SSLContext: the default CAs and those of `ca_file`, and the client
    certificate of `cert_file` with the key of `key_file` when given.

    Raises ConfigError, in one line, for a file that is missing, unreadable
    or not PEM, a key that does not match the certificate, and an encrypted
    key (kazoo is given no password: OpenSSL would ask for one on the
    terminal)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context.load_verify_locations, 'zookeeper_ca_file', ca_file, 'no CA certificate loads')
    if cert_file:
        # load_cert_chain says "PEM lib" for a bad certificate and for a bad
        # key alike: the certificate alone first, to name the right file.
        _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations,
              'zookeeper_cert_file', cert_file, 'no certificate loads')

        def no_password():
            # Called only for an encrypted key.
            raise ConfigError(f'zookeeper_key_file: {key_file!r} is encrypted: zkprefork gives '
                              'ZooKeeper client keys no password (use an unencrypted key)')
        _load(lambda path: context.load_cert_chain(cert_file, path, password=no_password),
              'zookeeper_key_file', key_file, 'unusable as the client key')
    return context


def _load(load, option, path, failure):
    try:
        load(path)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f'{option}: {path!r}: {failure} ({_reason(error)})') from None


def _reason(error):
    """OpenSSL's reason, in words where its own are obscure, or the OS's."""
    reason = getattr(error, 'reason', None)
    if reason == 'KEY_VALUES_MISMATCH':
        return 'the key does not match zookeeper_cert_file'
    if isinstance(error, ssl.SSLError) and 'PEM lib' in str(error):
        return 'not PEM'
    return reason or getattr(error, 'strerror', None) or str(error)
