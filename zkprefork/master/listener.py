"""The one listening socket, bound by the master, and the addresses it is
reachable at (what goes into ZooKeeper)."""
import errno
import ipaddress
import socket

import psutil

from zkprefork.settings import ConfigError

BACKLOG = 2048
_ANY = ('', '0.0.0.0', '::')


def is_wildcard(host):
    """Whether `host` means every address of the machine ('' too)."""
    return host in _ANY


def _resolve(host, port):
    if host in ('', '0.0.0.0'):
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


def format_address(host, port):
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def advertised_hosts(host):
    """The hosts a client can reach this server at.

    A wildcard host means every non-loopback IPv4 address of the machine (as
    zc.zkzopeserver registers), never 0.0.0.0; 127.0.0.1 when there is none.
    """
    if not is_wildcard(host):
        return [host]
    found = sorted({
        address.address
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback
    })
    return found or ['127.0.0.1']
