"""systemd integration without libsystemd: sd_notify messages and socket
activation, both plain sockets and environment variables."""
import os
import socket
import time

from zkprefork.settings import ConfigError

SD_LISTEN_FDS_START = 3


def notify(*lines):
    """Send READY=1, RELOADING=1, STOPPING=1, STATUS=... to the service
    manager; a no-op when not started by systemd with Type=notify."""
    address = os.environ.get('NOTIFY_SOCKET')
    if not address:
        return
    if address.startswith('@'):
        address = '\0' + address[1:]  # the abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto('\n'.join(lines).encode(), address)
        except OSError:
            pass  # the manager went away; serving matters more


def forget_notify_socket():
    """Only the master speaks to systemd (NotifyAccess=main)."""
    os.environ.pop('NOTIFY_SOCKET', None)


def activated_socket():
    """The listening socket systemd passed (LISTEN_FDS / LISTEN_PID), or None.

    The variables are removed so that no child takes the socket for its own."""
    pid = os.environ.pop('LISTEN_PID', None)
    count = os.environ.pop('LISTEN_FDS', None)
    os.environ.pop('LISTEN_FDNAMES', None)
    if pid != str(os.getpid()) or not count or int(count) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ConfigError('LISTEN_FDS: the socket systemd passed is not a listening TCP socket')
    sock.setblocking(False)
    return sock


class Notifier:
    """Tells systemd about state changes only (not on every loop turn)."""

    MESSAGES = {'ready': 'READY=1', 'reloading': 'RELOADING=1', 'stopping': 'STOPPING=1'}

    def __init__(self):
        self.state = 'starting'
        self.status = None

    def update(self, state, status):
        lines = []
        if state != self.state and state in self.MESSAGES:
            lines.append(self.MESSAGES[state])
            if state == 'reloading':
                # Type=notify-reload wants the time the reload started.
                lines.append(f'MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}')
            self.state = state
        if status != self.status:
            lines.append(f'STATUS={status}')
            self.status = status
        if lines:
            notify(*lines)
