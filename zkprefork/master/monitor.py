"""The monitor: a line-oriented command server inside the master's loop.

Protocol in the style of zc.monitor: connect, send ``command args\\n``, read
the answer until the server closes the connection. It runs on the master's
selector with no threads, so every client is bounded (line length, clients
at once, time) and none can stall the loop: sockets are non-blocking and
answers are written as the peer reads them.

An HTTP request line (``GET /metrics HTTP/1.1``, as Prometheus scrapes)
is answered in HTTP/1.0 instead, once its header block has arrived: the
`metrics` command's output for ``/metrics``, an error status otherwise.

Plugins: other packages add commands through the entry point group
``zkprefork.monitor``; each entry point names a callable
``command(connection, *args)`` that writes its answer with
``connection.write(text)`` and may read ``connection.status()`` (the same
dict as the `status` command).
"""
import inspect
import logging
import re
import selectors
import socket
import time
from importlib.metadata import entry_points

from zkprefork import addresses
from zkprefork.master import listener
from zkprefork.settings import ConfigError

log = logging.getLogger('zkprefork.monitor')

MAX_LINE = 1024  # bytes, newline included
MAX_HTTP_HEAD = 8192  # bytes of an HTTP request's line and headers
HTTP_REQUEST_LINE = re.compile(rb'([A-Z]+) (\S+) HTTP/1\.[01]\r?')
MAX_CLIENTS = 16
CLIENT_SECONDS = 5.0  # to send a line and read the answer
PLUGIN_GROUP = 'zkprefork.monitor'


def bind(host, port):
    """Listen; a busy port is a ConfigError (exit 2), not a traceback."""
    try:
        return listener.bind(host, port)
    except ConfigError as error:
        raise ConfigError(f'monitor_server: {error}') from None


def plugins():
    return {entry.name: entry for entry in entry_points(group=PLUGIN_GROUP)}


class Connection:
    """One client: reads a line, answers, closes."""

    def __init__(self, sock, monitor):
        self.sock = sock
        self.monitor = monitor
        self.inbox = b''
        self.outbox = b''
        self.answered = False
        self.deadline = time.monotonic() + CLIENT_SECONDS

    def write(self, text):
        self.outbox += text.encode()

    def status(self):
        return self.monitor.status()

    def on_event(self):
        """The selector says readable (before the answer) or writable (after)."""
        try:
            if self.answered:
                self._send()
            else:
                self._receive()
        except OSError:
            self.monitor.drop(self)

    def _receive(self):
        chunk = self.sock.recv(MAX_LINE)
        self.inbox += chunk
        line, newline, _ = self.inbox.partition(b'\n')
        http_request = HTTP_REQUEST_LINE.fullmatch(line) if newline else None
        if http_request:
            self._receive_http(http_request, chunk)
        elif newline or not chunk:
            self._answer(line.decode(errors='replace').strip())
        elif len(self.inbox) >= MAX_LINE:
            self.inbox = b''
            self.write(f'error: a command line is at most {MAX_LINE} bytes\n')
            self._answered()

    def _answer(self, line):
        words = line.split()
        if words:
            self.monitor.run_command(self, words[0], words[1:])
        else:
            self.write("error: no command; try 'help'\n")
        self._answered()

    def _receive_http(self, request_line, chunk):
        """Answer once the headers are in (a client that gets its answer
        before it has sent them all could see its connection reset)."""
        ended = b'\r\n\r\n' in self.inbox or b'\n\n' in self.inbox
        if ended or not chunk or len(self.inbox) > MAX_HTTP_HEAD:
            method, target = request_line.group(1, 2)
            self._answer_http(method, target.partition(b'?')[0], len(self.inbox) <= MAX_HTTP_HEAD)
            self._answered()

    def _answer_http(self, method, path, short_enough):
        from zkprefork.master.metrics import CONTENT_TYPE
        if not short_enough:
            status, body = '400 Bad Request', f'the request headers are over {MAX_HTTP_HEAD} bytes\n'
        elif path != b'/metrics':
            status, body = '404 Not Found', 'only /metrics is served here\n'
        elif method not in (b'GET', b'HEAD'):
            status, body = '405 Method Not Allowed', 'GET or HEAD\n'
        else:
            self.monitor.run_command(self, 'metrics', [])
            status, body = '200 OK', self.outbox.decode()
            self.outbox = b''
        content_type = CONTENT_TYPE if status == '200 OK' else 'text/plain; charset=utf-8'
        self.write(f'HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n'
                   f'Content-Length: {len(body.encode())}\r\nConnection: close\r\n\r\n')
        if method != b'HEAD':
            self.write(body)

    def _answered(self):
        self.answered = True
        self.monitor.selector.modify(self.sock, selectors.EVENT_WRITE, self.on_event)
        self._send()

    def _send(self):
        sent = self.sock.send(self.outbox)
        self.outbox = self.outbox[sent:]
        if not self.outbox:
            self.monitor.drop(self)


class Monitor:
    """Accepts monitor clients on `sock` and answers with `commands`
    (name -> (function(connection, *args), one-line help))."""

    def __init__(self, sock):
        self.sock = sock
        self.selector = None
        self.commands = {}
        self.status = None
        self.clients = {}
        self.paused = False  # a live upgrade's new master accepts on `sock`

    def start(self, selector, commands, status):
        """Serve on `selector`; `status()` is the dict the `status` command shows."""
        self.selector = selector
        self.commands = dict(commands)
        self.status = status
        for name, entry in plugins().items():
            self.commands.setdefault(name, (entry, f'(plugin {entry.value})'))
        selector.register(self.sock, selectors.EVENT_READ, self._accept)
        # The master's line, as it was when the master started the monitor itself.
        logging.getLogger('zkprefork.master').info('monitor listening at %s', self.advertised_address())

    def advertised_address(self):
        """HOST:PORT as a client elsewhere reaches it (never a wildcard host)."""
        host, port = self.sock.getsockname()[:2]
        return addresses.format_address(addresses.advertised_hosts(host)[0], port)

    def node_data(self):
        """What the registered node(s) say about the monitor."""
        return {'monitor': self.advertised_address()}

    def _accept(self):
        try:
            client, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        if len(self.clients) >= MAX_CLIENTS:
            client.close()  # busy: the operator retries; the loop stays free
            return
        connection = Connection(client, self)
        self.clients[client] = connection
        self.selector.register(client, selectors.EVENT_READ, connection.on_event)

    def drop(self, connection):
        self.clients.pop(connection.sock, None)
        self.selector.unregister(connection.sock)
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        connection.sock.close()

    def next_deadline(self):
        return min((c.deadline for c in self.clients.values()), default=float('inf'))

    def expire(self, now):
        for connection in [c for c in self.clients.values() if c.deadline <= now]:
            self.drop(connection)

    def run_command(self, connection, name, args):
        if name not in self.commands:
            connection.write(f"error: unknown command {name!r}; 'help' lists the commands\n")
            return
        function = self.commands[name][0]
        if hasattr(function, 'load'):  # a plugin's entry point, loaded when first used
            function = function.load()
            self.commands[name] = (function, self.commands[name][1])
        try:
            inspect.signature(function).bind(connection, *args)
        except TypeError:
            connection.write(f'error: {name} does not take {len(args)} argument(s); \'help\' lists the commands\n')
            return
        except ValueError:
            pass  # a callable without a signature to check: let the call tell
        try:
            function(connection, *args)
        except Exception as error:  # a plugin's bug must not stop the master
            log.exception('monitor command %r failed', name)
            connection.write(f'error: {name} failed: {error!r}\n')

    def fds(self):
        return [self.sock.fileno()] + [client.fileno() for client in self.clients]

    def pause(self):
        """A live upgrade: stop accepting (the new master accepts on this
        socket); returns its fd, which stays open for resume()."""
        self.selector.unregister(self.sock)
        self.paused = True
        return self.sock.fileno()

    def resume(self):
        """The upgrade failed: accept again."""
        self.selector.register(self.sock, selectors.EVENT_READ, self._accept)
        self.paused = False

    def close(self):
        for connection in list(self.clients.values()):
            self.drop(connection)
        if self.selector and not self.paused:
            self.selector.unregister(self.sock)
        self.sock.close()

    def help(self, connection):
        width = max(len(name) for name in self.commands)
        for name, (_, text) in sorted(self.commands.items()):
            connection.write(f'{name:<{width}}  {text}\n')


class NoMonitor:
    """The master's monitor without a monitor_server option."""

    def start(self, selector, commands, status):
        pass

    def node_data(self):
        return {}

    def next_deadline(self):
        return float('inf')

    def expire(self, now):
        pass

    def fds(self):
        return []

    def pause(self):
        return None

    def resume(self):
        pass

    def close(self):
        pass
