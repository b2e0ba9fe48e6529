"""Host and port, as every process writes and reads them.

The one place that knows which hosts mean "every address of the machine",
which loopback address reaches a wildcard listener, and how a host:port is
written (IPv6 in brackets, RFC 3986 3.2.2) and read back.
"""
import ipaddress
import re
import socket

import psutil

# host -> the loopback address that reaches a socket bound to it.
_WILDCARDS = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}
HOST_PORT = re.compile(r'^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]*)(?::(?P<port>[^:]*))?$')


def is_wildcard(host):
    """Whether `host` means every address of the machine ('' too)."""
    return host in _WILDCARDS


def reachable_host(host):
    """The host a process of this machine connects to for a socket bound to
    `host`: loopback for a wildcard, else `host` itself."""
    return _WILDCARDS.get(host, host)


def bindable_host(host):
    """What a socket binds for `host`: '' means IPv4's wildcard, 0.0.0.0."""
    return host or '0.0.0.0'


def format_address(host, port):
    """'host:port', or '[v6]:port' for an IPv6 address."""
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def parse_address(text):
    """'host:port' or '[v6]:port' -> (host, port); None if it is neither."""
    host, colon, port = text.rpartition(':')
    # isdigit() alone is true for '²', which int() refuses.
    if not colon or not (port.isascii() and port.isdigit()):
        return None
    return host.strip('[]'), int(port)


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
