"""Health-gated registration: is the application answering, as a client
sees it?

A `Checker` thread in the registrar requests the ``health_check`` path
through the server's real listening socket every ``interval`` seconds (a 2xx
answer within ``timeout`` passes), and posts each result to the registrar's
loop; `Health` turns the results into HAProxy's UP and DOWN: DOWN at start,
UP after ``rise`` passes in a row (a restarted registrar starts as its
predecessor ended), DOWN again after ``fall`` failures in a
row. The registrar registers only while UP. Nothing here runs in a worker or
in the master.

Over TLS the check is an HTTPS client of its own server (tls.client_context:
the server's certificate is not verified, a client certificate is presented
when the server asks for one), and reads its certificate files again on
every reload, as the workers do.

During a live upgrade the socket is shared by two masters' workers: a
check answered by the other master's (health.ANSWER_FIELD) is not counted,
and sent again on a new connection, up to OTHERS_TRIES times.
"""
import http.client
import logging
import os
import threading
import time

from zkprefork import health, tls
from zkprefork.addresses import format_address
from zkprefork.errors import ConfigError

log = logging.getLogger('zkprefork.registrar')

UP, DOWN = 'up', 'down'
# Checks in a row answered by another master's workers before one is given
# up as uncounted: with half the workers each, 1 in 2**8 checks.
OTHERS_TRIES = 8


def probe(host, port, path, timeout, answer_timeout=-1, context=None):
    """GET `path` from host:port: (passed, one-line detail, the answering
    worker's master's pid or None). `timeout` (seconds) bounds the connect
    (and the TLS handshake), `answer_timeout` the wait for the answer (the
    same by default; None: as long as the server holds the request). With
    `context` (an ssl.SSLContext), over TLS; a failed handshake is an
    ssl.SSLError's detail."""
    if context is None:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        connection.connect()
        connection.sock.settimeout(timeout if answer_timeout == -1 else answer_timeout)
        connection.request('GET', path, headers={'Connection': 'close', health.CHECK_FIELD: '1',
                                                 'User-Agent': 'zkprefork-health-check'})
        response = connection.getresponse()
        response.read()
        master = response.getheader(health.ANSWER_FIELD)
        return (200 <= response.status < 300, f'HTTP {response.status}',
                int(master) if master and master.isdigit() else None)
    except (OSError, http.client.HTTPException) as error:
        return False, f'{type(error).__name__}: {error}' if str(error) else type(error).__name__, None
    finally:
        connection.close()


class Health:
    """The rise and fall rule, and what it has seen (as the monitor shows it)."""

    def __init__(self, path, rise, fall, up=False):
        self.path = path
        self.rise = rise
        self.fall = fall
        self.state = UP if up else DOWN
        self.streak = 0  # results in a row that go against `state`
        self.checks = self.failures = 0
        self.passing = 0  # checks passed in a row, up to now
        self.rises = self.falls = 0  # transitions so far
        self.last = None  # the last result's detail

    @property
    def up(self):
        return self.state == UP

    def record(self, passed, detail):
        """Count one result (None: answered by another master's workers
        only, not counted). Returns True when it changes the state."""
        if passed is None:
            return False
        self.checks += 1
        self.failures += not passed
        self.passing = self.passing + 1 if passed else 0
        self.last = detail
        self.streak = self.streak + 1 if passed != self.up else 0
        if self.streak < (self.fall if self.up else self.rise):
            return False
        self.state, self.streak = (DOWN, 0) if self.up else (UP, 0)
        if self.up:
            self.rises += 1
        else:
            self.falls += 1
        return True

    def describe(self):
        if self.up:
            return f'health check {self.path}: UP ({self.rise} passed in a row, {self.last})'
        return f'health check {self.path}: DOWN ({self.fall} failed in a row, last: {self.last})'

    def status(self):
        """A JSON-ready dict for the registration state."""
        return {'check': self.path, 'state': self.state, 'checks': self.checks,
                'failures': self.failures, 'passing': self.passing, 'rises': self.rises,
                'falls': self.falls, 'last': self.last}


class Checker:
    """The thread that probes, posting ('health', (passed, detail)) to the
    loop every interval; the loop is never kept waiting by one.

    A check unanswered at its timeout fails, but its request is not given
    up: closing our socket would not free the application's thread that
    runs it. Until the server answers it (or closes the connection), no
    other check is sent, and each interval counts one more failure: checks
    never hold more than one of the application's threads."""

    def __init__(self, options, host, port, post):
        """`options`: a registrar_protocol.HealthCheckOptions; `host`, `port`:
        the listening socket's address."""
        self.options = options
        self.target = (host, port)
        self.post = post
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name='health-check')
        self.outstanding = None  # the request thread of a check unanswered at its timeout
        self.sent = None  # when it was sent (monotonic seconds)
        self.generation = None  # of the register commands seen (a new one: a reload)
        self.context = self.unloadable = None  # the TLS context, or why it did not load
        if options.tls:
            self._load_context()

    def start(self):
        over = ''
        if self.options.tls:
            over = f' over TLS (client certificate {self.options.certfile!r})' \
                if self.options.certfile else ' over TLS'
        log.info('health check: GET %s from %s%s every %g s', self.options.path,
                 format_address(*self.target), over, self.options.interval)
        self.thread.start()

    def follow(self, data):
        """A register command's `data` (a dict): a new ``generation`` is a
        reload, which reads the certificate files again, as the workers'."""
        generation = data.get('generation')
        if self.generation is not None and generation != self.generation and self.options.tls:
            self._load_context()
        self.generation = generation

    def _load_context(self):
        """Make the TLS context from the files. One that fails to load is
        one log line; the previous context, if any, goes on being used (the
        master had checked the files moments before: this is a file
        changed since, as a bad reload keeps the old workers serving)."""
        options = self.options
        try:
            self.context = tls.client_context(options.certfile, options.keyfile,
                                              options.keyfile_password_file)
            self.unloadable = None
        except ConfigError as error:
            kept = 'keeping the one loaded before' if self.context else 'every check fails'
            log.error('health check: the client certificate does not load (%s): %s', error, kept)
            self.unloadable = str(error)

    def stop(self):
        self.stopping.set()

    def _run(self):
        due = time.monotonic()
        while not self.stopping.is_set():
            result = self._check()
            if not self.stopping.is_set():
                self.post('health', result)
            # Every `interval` from the start of the last one, as HAProxy's inter.
            due = max(due + self.options.interval, time.monotonic())
            self.stopping.wait(due - time.monotonic())

    def _check(self):
        """One check's (passed, detail), within the timeout each try; (None,
        detail) if only another master's workers answered (not counted)."""
        for _ in range(OTHERS_TRIES):
            passed, detail, master = self._check_once()
            if master in (None, os.getppid()):
                return passed, detail
        return None, f'{detail} from the workers of another master (pid {master})'

    def _check_once(self):
        if self.outstanding is not None and self.outstanding.is_alive():
            return False, (f'the previous check is still unanswered after '
                           f'{time.monotonic() - self.sent:.1f} s: not sending another'), None
        context = self.context
        if self.options.tls and context is None:
            return False, self.unloadable, None
        result = []
        self.outstanding = threading.Thread(target=lambda: result.append(probe(
            *self.target, self.options.path, self.options.timeout, answer_timeout=None,
            context=context)), daemon=True, name='health-check-request')
        self.sent = time.monotonic()
        self.outstanding.start()
        self.outstanding.join(self.options.timeout)
        if result:
            return result[0]
        return False, f'no answer within {self.options.timeout:g} s', None
