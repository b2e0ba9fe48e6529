"""The worker -> master line protocol, one message per line, over the
socketpair each worker gets at fork:

    ready PID               the application is loaded and the server listens
    hb REQUESTS             heartbeat (about once a second): requests served so far
    retire LIMIT REASON     worn out (LIMIT: max_requests, max_memory or
                            request_timeout, the option that was reached): please replace me
    boot-failed ERROR       the application did not load (one-line summary)

The worker writes with `encode`, the master reads with `Link` and `decode`.
End of file on the socket means, to the worker, that the master is gone.
"""
from typing import NamedTuple

from zkprefork.lines import LineReader


class Ready(NamedTuple):
    pid: int


class Heartbeat(NamedTuple):
    requests: int


class RetireRequest(NamedTuple):
    limit: str  # the option that was reached (one word)
    reason: str


class BootFailed(NamedTuple):
    error: str


WORDS = {Ready: 'ready', Heartbeat: 'hb', RetireRequest: 'retire', BootFailed: 'boot-failed'}
TYPES = {word: kind for kind, word in WORDS.items()}


def encode(message):
    """One message as the bytes of one line: its fields, space-separated
    (only the last may hold spaces)."""
    text = ' '.join(str(field).replace('\n', ' ') for field in message)
    return f'{WORDS[type(message)]} {text}\n'.encode()


def decode(line):
    """The message a line holds, or None for a line that is not one."""
    word, _, text = line.partition(' ')
    kind = TYPES.get(word)
    if kind is None:
        return None
    converters = list(kind.__annotations__.values())
    parts = text.split(' ', len(converters) - 1)
    if len(parts) != len(converters):
        return None
    try:
        return kind(*(convert(part) for convert, part in zip(converters, parts)))
    except ValueError:
        return None


class Link:
    """The master's end of one worker's socket."""

    def __init__(self, sock):
        sock.setblocking(False)
        self.sock = sock
        self._reader = LineReader(sock.recv)

    def fileno(self):
        return self.sock.fileno()

    def messages(self):
        """Messages since the last call; None once the worker closed its end."""
        lines = self._reader.lines()
        if lines is None:
            return None
        return [message for message in map(decode, lines) if message is not None]

    def close(self):
        self.sock.close()
