"""TLS on a worker's connections: the handshake, driven by the worker's
event loop, then a channel whose reads and writes go through OpenSSL.

An accepted connection first becomes a `Handshake`, a dispatcher of the
loop's own (no pool thread waits on it): each readable or writable event
runs `do_handshake()` once more, non-blocking. A handshake that stalls is
closed after request_read_timeout (the server's once-a-second expiry); one
that fails (a TLS version or cipher refused, plain HTTP on the TLS port, a
client certificate missing or not signed by ca_certs) closes the
connection and is counted by reason, and logged at INFO at most once per
LOG_INTERVAL seconds, so that a scanner cannot fill the log. A handshake
that completes hands its socket to the channel class the server serves
plaintext with, made TLS-aware by `tls_channel_class`: everything else
(parsing, keep-alive, timeouts, balancing, draining) is the same code.

OpenSSL's SSL objects are not safe to use from two threads at once, and a
channel is read by the loop's thread while a pool thread writes its
response: every SSL call of a channel holds the channel's `tls_lock`
(non-blocking calls, so it is held for microseconds).
"""
import asyncore
import logging
import ssl
import sys
import threading

from zkprefork import clock
from zkprefork.tls import rfc4514

log = logging.getLogger('zkprefork.worker')

LOG_INTERVAL = 60.0  # seconds between two log lines about failed handshakes


def failure_reason(error):
    """One of tls.HANDSHAKE_FAILURES for the exception a handshake ended with."""
    reason = getattr(error, 'reason', None) or ''
    if reason == 'HTTP_REQUEST':
        return 'http_request'
    if 'CERTIFICATE' in reason or reason == 'TLSV1_ALERT_UNKNOWN_CA':
        return 'certificate'
    if any(word in reason for word in ('VERSION', 'PROTOCOL', 'CIPHER')):
        return 'protocol'
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)) or 'EOF' in reason:
        return 'closed'
    return 'other'


class Handshakes:
    """A server's handshakes in progress, and the count of those that ended."""

    def __init__(self, context, make_channel, counter):
        self.context = context
        self.make_channel = make_channel  # (server, ssl socket, addr, adj) -> the channel
        # The worker's observer: .handshake_completed(), .handshake_failed(reason),
        # and .channel_opened/closed(connection), so that a connection counts
        # (in `connections`, and as waiting for a thread) from its accept on.
        self.counter = counter
        self.pending = set()
        self._logged_at = None
        self._unlogged = 0

    def begin(self, server, conn, addr, adj):
        """The server's channel_class: an accepted `conn` starts its handshake."""
        try:
            wrapped = self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except OSError:
            conn.close()  # gone before it could be wrapped
            return
        Handshake(self, server, wrapped, addr, adj)

    def failed(self, addr, reason, error):
        self.counter.handshake_failed(reason)
        now = clock.now()
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            self._unlogged += 1
            return
        more = f' ({self._unlogged} more since the last such line)' if self._unlogged else ''
        self._logged_at, self._unlogged = now, 0
        log.info('TLS handshake with %s failed (%s): %s%s', addr[0] if addr else '?', reason,
                 error, more)


class Handshake(asyncore.dispatcher):
    """One connection's TLS handshake, in the loop's map until it ends."""

    def __init__(self, handshakes, server, sock, addr, adj):
        self.handshakes, self.server, self.adj = handshakes, server, adj
        self.started = clock.now()
        self.wants_write = False
        super().__init__(sock, map=server._map)
        handshakes.pending.add(self)
        handshakes.counter.channel_opened(self)
        self._step()

    def readable(self):
        return not self.wants_write

    def writable(self):
        return self.wants_write

    def handle_read(self):
        self._step()

    handle_write = handle_read

    def handle_close(self):
        self.give_up('closed', 'the client closed the connection')

    def handle_error(self):
        self.give_up('other', sys.exc_info()[1])

    def busy(self):
        return True  # a draining worker waits for it: the request may follow

    def expire_stalled(self, now):
        timeout = self.adj.http.request_read_timeout
        if now - self.started >= timeout:
            self.give_up('timeout', f'no handshake within {timeout:g} s')

    def _step(self):
        try:
            self.socket.do_handshake()
        except ssl.SSLWantReadError:
            self.wants_write = False
        except ssl.SSLWantWriteError:
            self.wants_write = True
        except OSError as error:
            self.give_up(failure_reason(error), getattr(error, 'reason', None) or error)
        else:
            self._done()

    def _done(self):
        sock, addr = self.socket, self.addr
        self._forget()
        self.del_channel()  # the channel takes the fd over in the same map
        self.socket = None
        self.handshakes.counter.handshake_completed()
        self.handshakes.make_channel(self.server, sock, addr, self.adj)

    def give_up(self, reason, error):
        if self in self.handshakes.pending:
            self.handshakes.failed(self.addr, reason, error)
        self.close()

    def close(self):
        self._forget()
        super().close()

    def _forget(self):
        if self in self.handshakes.pending:
            self.handshakes.pending.discard(self)
            self.handshakes.counter.channel_closed(self)


def tls_channel_class(base):
    """`base` (a channel class) reading and writing through its SSL socket."""
    return type(f'TLS{base.__name__}', (TLSChannel, base), {})


class TLSChannel:
    """The TLS half of a channel class made by tls_channel_class."""

    zero_copy = False  # os.sendfile would send the file unencrypted: the response copies

    def __init__(self, server, conn, addr, adj=None):
        self.tls_lock = threading.Lock()
        self.tls_environ = connection_environ(conn)
        super().__init__(server, conn, addr, adj)

    def recv(self, buffer_size):
        """Decrypted bytes; b'' (after handle_close) at the end; None when
        the record is not complete yet (the loop calls again)."""
        with self.tls_lock:
            try:
                data = self.socket.recv(buffer_size)
                while data and self.socket.pending():  # decrypted already: epoll won't tell
                    data += self.socket.recv(self.socket.pending())
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b''
        if not data:
            self.handle_close()
        return data

    def send(self, data):
        """As the plaintext channel's send. OpenSSL wants a retry to repeat
        at least what it was given: the output buffer's head is what is
        resent (it only grows until sent)."""
        with self.tls_lock:
            return super().send(data)


def connection_environ(sock):
    """The environ of a TLS connection, with mod_ssl's names (mod_ssl's
    "Environment Variables"): HTTPS, SSL_PROTOCOL, SSL_CIPHER and, with a
    client certificate, SSL_CLIENT_VERIFY, SSL_CLIENT_S_DN, SSL_CLIENT_I_DN
    (RFC 4514), SSL_CLIENT_SAN_DNS_n, SSL_CLIENT_SAN_URI_n, SSL_CLIENT_CERT (PEM)."""
    environ = {'HTTPS': 'on', 'SSL_PROTOCOL': sock.version(),
               'SSL_CIPHER': sock.cipher()[0], 'SSL_CLIENT_VERIFY': 'NONE'}
    der = sock.getpeercert(binary_form=True)
    if not der:
        return environ
    peer = sock.getpeercert()  # decoded only when verified, which ca_certs makes it
    environ.update(SSL_CLIENT_VERIFY='SUCCESS', SSL_CLIENT_CERT=ssl.DER_cert_to_PEM_cert(der),
                   SSL_CLIENT_S_DN=rfc4514(peer.get('subject', ())),
                   SSL_CLIENT_I_DN=rfc4514(peer.get('issuer', ())))
    counts = {}
    for kind, value in peer.get('subjectAltName', ()):
        name = {'DNS': 'DNS', 'URI': 'URI'}.get(kind)
        if name:
            environ[f'SSL_CLIENT_SAN_{name}_{counts.get(name, 0)}'] = value
            counts[name] = counts.get(name, 0) + 1
    return environ
