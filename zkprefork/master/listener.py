"""The one listening socket, bound by the master."""
import errno
import socket

from zkprefork.addresses import bindable_host, format_address
from zkprefork.settings import ConfigError

BACKLOG = 2048


def _resolve(host, port):
    if bindable_host(host) == '0.0.0.0':
        return socket.AF_INET, ('0.0.0.0', port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, 'strerror', None) or str(error)
        raise ConfigError(f'host: cannot resolve {host!r}: {reason}') from None
    family, _, _, _, address = infos[0]
    return family, address


def bind(host, port):
    """Bind and listen; every failure is a ConfigError naming the option."""
    family, address = _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == '::':
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        raise ConfigError(_bind_error(host, port, error)) from None
    sock.setblocking(False)
    return sock


def _bind_error(host, port, error):
    shown = format_address(host, port)
    if error.errno == errno.EADDRINUSE:
        return f'port: {shown} is already in use'
    if error.errno == errno.EADDRNOTAVAIL:
        return f'host: {host!r} is not an address of this machine'
    if error.errno == errno.EACCES:
        return f'port: no permission to bind {shown}'
    return f'host/port: cannot bind {shown}: {error.strerror}'


def bound_port(sock):
    return sock.getsockname()[1]
