"""Wall-clock steps (NTP, a resumed VM) in the middle of a run: connection
timers, the drain of a stop and zope.server's own timers measure durations
on the monotonic clock (zkprefork/clock.py), so a step changes none of them.

The step is real for the servers' processes and for them only: a
sitecustomize.py on their PYTHONPATH shifts time.time() (and time_ns()) by
the seconds written in a file, read again at most every 20 ms, so that the
test steps the clock of running servers. (libfaketime cannot be used:
Python's time.sleep() fails with EINVAL under it.)"""
import ast
import email.utils
import os
import pathlib
import signal
import socket
import time

import pytest

from support import closed_after

pytestmark = pytest.mark.timeout(90)

HOUR = 3600.0
# Before a step: the worker has read what was sent, and noted the activity,
# on the clock before the step (on a loaded machine that can take a while).
SETTLE = 0.3

SITECUSTOMIZE = '''\
import os
import time

_wall, _wall_ns, _monotonic = time.time, time.time_ns, time.monotonic
_file = os.environ['ZKPREFORK_TEST_CLOCK_STEP']
_state = [float('-inf'), 0.0]  # when to read the file again (monotonic), the step in seconds


def _step():
    now = _monotonic()
    if now >= _state[0]:
        _state[0] = now + 0.02
        try:
            with open(_file) as file:
                _state[1] = float(file.read() or 0)
        except (OSError, ValueError):
            pass
    return _state[1]


def _stepped_time():
    return _wall() + _step()


def _stepped_time_ns():
    return _wall_ns() + int(_step() * 1e9)


time.time, time.time_ns = _stepped_time, _stepped_time_ns
'''


class SteppedClock:
    """The wall clock of the servers started with `env`, stepped by `step()`."""

    def __init__(self, directory):
        shim = directory / 'clockshim'
        shim.mkdir()
        (shim / 'sitecustomize.py').write_text(SITECUSTOMIZE)
        self.file = directory / 'clock-step'
        self.file.write_text('0')
        path = os.pathsep.join(filter(None, [str(shim), os.environ.get('PYTHONPATH')]))
        self.env = {'PYTHONPATH': path, 'ZKPREFORK_TEST_CLOCK_STEP': str(self.file),
                    'PYTHONDONTWRITEBYTECODE': '1'}

    def step(self, seconds):
        """From now on the servers' time.time() is real time + `seconds`."""
        new = self.file.with_name('clock-step.new')
        new.write_text(repr(float(seconds)))
        os.replace(new, self.file)
        time.sleep(0.05)  # past the shim's 20 ms cache


@pytest.fixture
def clock(tmp_path):
    return SteppedClock(tmp_path)


@pytest.fixture
def start(servers, ini, clock):
    """start(options) -> a serving master (demo app, 1 worker) whose clock `clock` steps."""
    def start(options=''):
        config = ini(f'host = 127.0.0.1\nworkers = 1\n{options}')
        return servers(config, env=clock.env).wait_serving()
    return start


def connect(server):
    return socket.create_connection(('127.0.0.1', server.port), timeout=10)


def ask(sock, path='/', body=None):
    """Send a keep-alive request; (status, head fields) of its response."""
    head = f'{"POST" if body is not None else "GET"} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n'
    if body is not None:
        head += f'Content-Length: {len(body)}\r\n'
    sock.sendall(head.encode() + b'\r\n' + (body or b''))
    return read_response(sock)


def read_response(sock):
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = sock.recv(65536)
        assert chunk, f'the server closed the connection (after {data!r})'
        data += chunk
    head, _, rest = data.partition(b'\r\n\r\n')
    status_line, *lines = head.decode('latin-1').split('\r\n')
    fields = {name.lower(): value.strip() for name, _, value in (line.partition(':') for line in lines)}
    length = int(fields.get('content-length', 0))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, 'the server closed the connection within a response'
        rest += chunk
    return int(status_line.split()[1]), fields


def served_then_stepped(sock, clock, step):
    """One request served on `sock`, then the servers' clock stepped by `step` s
    once the connection is idle."""
    assert ask(sock)[0] == 200
    time.sleep(SETTLE)
    clock.step(step)


def date_of(fields):
    return email.utils.parsedate_to_datetime(fields['date']).timestamp()


def test_the_step_reaches_the_servers_clock_only(start, clock):
    # The premise of every other test here: a step moves the running
    # servers' time.time() (their Date field), not the test's.
    server = start()
    with connect(server) as sock:
        assert abs(date_of(ask(sock)[1]) - time.time()) < 2
        clock.step(-HOUR)
        assert abs(date_of(ask(sock)[1]) - (time.time() - HOUR)) < 2
        clock.step(HOUR)
        assert abs(date_of(ask(sock)[1]) - (time.time() + HOUR)) < 2


def test_stepped_back_an_idle_keep_alive_connection_is_still_closed(start, clock):
    # Before: time.time() - last_activity was an hour negative: never closed.
    server = start('keepalive = 2\n')
    with connect(server) as sock:
        served_then_stepped(sock, clock, -HOUR)
        assert 1.2 < closed_after(sock, limit=8) < 4.5  # keepalive = 2, checked every second


def test_stepped_forward_a_connection_idle_within_keepalive_stays_open(start, clock):
    # Before: idle "an hour" at the next check: closed, and the client's
    # next request on it got no response.
    server = start('keepalive = 5\n')
    with connect(server) as sock:
        served_then_stepped(sock, clock, HOUR)
        time.sleep(2.5)
        assert ask(sock)[0] == 200
        assert 4.0 < closed_after(sock, limit=10) < 7.5  # and keepalive still ends it


def test_stepped_forward_zope_servers_zombie_sweep_spares_idle_connections(start, clock):
    # zope.server closes channels idle for channel_timeout (900 s) when a
    # new connection comes, at most every cleanup_interval (300 s). Before:
    # on its wall clock, 1000 s forward made every idle connection a zombie.
    server = start('keepalive = 1200\n')
    with connect(server) as idle:
        assert ask(idle)[0] == 200
        clock.step(1000)
        with connect(server) as other:  # its opening runs the sweep
            assert ask(other)[0] == 200
            time.sleep(1.5)  # and one check of keepalive
            assert ask(idle)[0] == 200


def test_stepped_forward_a_body_still_arriving_is_not_refused(start, clock):
    # Before: the body's last byte was "an hour" old: 408 at the next check.
    server = start()  # request_read_timeout = 30
    with connect(server) as sock:
        sock.sendall(b'POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n12345')
        time.sleep(SETTLE)
        clock.step(HOUR)
        time.sleep(2.5)  # two checks
        sock.sendall(b'67890')
        assert read_response(sock)[0] == 200


def test_stepped_back_a_body_that_stopped_is_refused_after_request_read_timeout(start, clock):
    # 400 bytes at 1 byte/s allowed: only the idle rule (request_read_timeout
    # without a byte) ends it within 400 s. Before: an hour back, it never
    # did.
    server = start('request_read_timeout = 2\nrequest_body_min_rate = 1\n')
    with connect(server) as sock:
        sock.sendall(b'POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 800\r\n\r\n' + b'x' * 400)
        time.sleep(SETTLE)
        clock.step(-HOUR)
        sock.settimeout(8)
        assert read_response(sock)[0] == 408


def test_stepped_back_sigterm_closes_idle_connections_promptly(start, clock):
    # Before: the drain took the hour-old wall clock for "idle since" and
    # waited the whole graceful_timeout for the connection.
    server = start('keepalive = 30\ngraceful_timeout = 20\n')
    with connect(server) as sock:
        served_then_stepped(sock, clock, -HOUR)
        time.sleep(0.6)  # idle longer than a stopping worker keeps a connection (0.5 s)
        stopping = time.monotonic()
        server.signal(signal.SIGTERM)
        assert closed_after(sock, limit=10) < 3
    assert server.wait(10) == 0
    assert time.monotonic() - stopping < 4


def test_stepped_back_a_stuck_thread_delays_the_workers_exit_by_a_second_only(start, clock):
    # After graceful_timeout the worker waits 1 s for its threads, then
    # exits. Before: zope.server waited on the wall clock, so a step back in
    # that second made it wait until the master killed it (graceful_timeout
    # + 5 s), without its "stopped" line.
    server = start('graceful_timeout = 1\n')
    sock = connect(server)
    try:
        sock.sendall(b'GET /sleep?s=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
        time.sleep(0.5)  # the request runs
        server.signal(signal.SIGTERM)
        server.wait_for_log(r'gave up on 1 connection\(s\) after graceful_timeout', timeout=10)
        clock.step(-HOUR)
        gave_up = time.monotonic()
        server.wait_for_log(r'worker 0 \(pid \d+\) stopped: signal SIGTERM', timeout=8)
        assert time.monotonic() - gave_up < 2.5
        assert server.wait(10) == 0
    finally:
        sock.close()
    assert 'still running after graceful_timeout' not in server.log()


# -- the class of fault, closed once: durations are never measured on the wall clock --

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'zkprefork'

# Where zkprefork reads the wall clock (module, function), each for a
# timestamp, or (clock.py) to hand a monotonic instant to code that compares
# it with time.time().
WALL_CLOCK_READERS = {
    ('clock.py', 'as_wall_clock'),                   # the one translation
    ('registrar/nodes.py', 'register'),              # registered_at, shown in the curator format
    ('registrar/loop.py', '__init__'),               # State.since: when the state changed
    ('registrar/loop.py', '_report'),
    ('registrar/loop.py', '_without_credentials'),   # the stamp of the 'failed' event
    ('tls.py', 'check_validity'),                   # a certificate's validity is a date
}


class WallClockReads(ast.NodeVisitor):
    """(module, innermost function, line) of every time.time() / time.time_ns()
    and every `from time import time` in a module."""

    def __init__(self, module):
        self.module, self.functions, self.found = module, ['<module>'], set()

    def visit_FunctionDef(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node):
        if node.attr in ('time', 'time_ns') and isinstance(node.value, ast.Name) and node.value.id == 'time':
            self.found.add((self.module, self.functions[-1], node.lineno))
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        if node.module == 'time' and {alias.name for alias in node.names} & {'time', 'time_ns'}:
            self.found.add((self.module, self.functions[-1], node.lineno))


def wall_clock_reads():
    found = set()
    for path in sorted(PACKAGE.rglob('*.py')):
        visitor = WallClockReads(path.relative_to(PACKAGE).as_posix())
        visitor.visit(ast.parse(path.read_text(), str(path)))
        found |= visitor.found
    return found


def test_the_wall_clock_is_read_only_for_timestamps():
    reads = wall_clock_reads()
    assert ('clock.py', 'as_wall_clock') in {read[:2] for read in reads}  # the scan sees them
    unexpected = sorted(read for read in reads if read[:2] not in WALL_CLOCK_READERS)
    assert not unexpected, ('time.time() measures no duration: use zkprefork.clock.now(), or list '
                            f'a timestamp in WALL_CLOCK_READERS: {unexpected}')
