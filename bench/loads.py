"""The loads: what each measured cell sends, and the two clients that send it.

    LOADS       name -> Load (path, connections, headers, description, app, tls)
    run_wrk     req/s, p50/p99/p99.9 and errors of one cell (wrk --latency),
                the server's CPU per request, and the CPU that processes the
                bench did not start used meanwhile
    run_fairness  responses per connection of one cell (bench/loadgen.py):
                the slowest connection, the connections that got nothing,
                Jain's fairness index

All traffic goes to 127.0.0.1.
"""
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time

import psutil

from zkprefork.testing import ProcessUnderTest

BENCH = os.path.dirname(os.path.abspath(__file__))

# app: the module the servers serve for this load (bench/apps.py, or
# realapps.py: Flask and Django); tls: sent over HTTPS (wrk and loadgen).
Load = collections.namedtuple('Load', 'path conns headers description app tls', defaults=('apps', False))
CLOSE = ['Connection: close']
LOADS = {
    'hello-ka16': Load('/', 16, [], 'hello world, 16 keep-alive connections'),
    'hello-ka64': Load('/', 64, [], 'hello world, 64 keep-alive connections'),
    'hello-ka256': Load('/', 256, [], 'hello world, 256 keep-alive connections'),
    'hello-ka1000': Load('/', 1000, [], 'hello world, 1000 keep-alive connections'),
    'hello-close64': Load('/', 64, CLOSE, 'hello world, 64 connections, `Connection: close`'),
    'sleep10-ka16': Load('/sleep10', 16, [], '10 ms app, 16 keep-alive connections'),
    'sleep10-ka64': Load('/sleep10', 64, [], '10 ms app, 64 keep-alive connections'),
}
# The real applications (issue 22): each route at 16 and 64 keep-alive
# connections and at 64 with `Connection: close`.
ROUTES = {'page': ('/page', 'Flask page (Jinja, 50 rows)'), 'api': ('/api', 'Flask JSON API (100 objects)'),
          'django': ('/django', 'Django template view (50 rows)')}
for _route, (_path, _what) in ROUTES.items():
    LOADS[f'{_route}-ka16'] = Load(_path, 16, [], f'{_what}, 16 keep-alive connections', 'realapps')
    LOADS[f'{_route}-ka64'] = Load(_path, 64, [], f'{_what}, 64 keep-alive connections', 'realapps')
    LOADS[f'{_route}-close64'] = Load(_path, 64, CLOSE, f'{_what}, 64 connections, `Connection: close`',
                                      'realapps')
# Over TLS (issue 19): hello world and the Flask page, kept connections and
# new ones (a full handshake each: see fullhandshake.c). realapps serves both
# paths, so one server process per kind serves a whole TLS round.
for _route, _path in (('hello', '/'), ('page', '/page')):
    LOADS[f'tls-{_route}-ka64'] = Load(_path, 64, [], f'TLS, {_route}, 64 keep-alive connections', 'realapps', True)
    LOADS[f'tls-{_route}-close64'] = Load(_path, 64, CLOSE, f'TLS, {_route}, 64 new connections (full handshakes)',
                                          'realapps', True)
SHIM_SOURCE = os.path.join(BENCH, 'fullhandshake.c')
SHIM = os.path.join(BENCH, 'results', 'tmp', 'fullhandshake.so')

_UNITS = {'us': 0.001, 'ms': 1.0, 's': 1000.0, 'm': 60000.0}


def _ms(text):
    value, unit = re.match(r'([\d.]+)(us|ms|s|m)', text).groups()
    return float(value) * _UNITS[unit]


def parse_wrk(output):
    result = {'rps': 0.0, 'requests': 0, 'p50_ms': None, 'p99_ms': None, 'p999_ms': None,
              'connect': 0, 'read': 0, 'write': 0, 'timeout': 0, 'non2xx': 0}
    match = re.search(r'Requests/sec:\s+([\d.]+)', output)
    if match:
        result['rps'] = float(match.group(1))
    match = re.search(r'(\d+) requests in', output)
    if match:
        result['requests'] = int(match.group(1))
    for pct, key in (('50', 'p50_ms'), ('99', 'p99_ms')):
        match = re.search(rf'^\s+{pct}%\s+(\S+)', output, re.M)
        if match:
            result[key] = _ms(match.group(1))
    match = re.search(r'^percentile-us 99\.9 (\d+)', output, re.M)  # from latency.lua
    if match:
        result['p999_ms'] = int(match.group(1)) / 1000
    match = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', output)
    if match:
        for key, value in zip(('connect', 'read', 'write', 'timeout'), match.groups()):
            result[key] = int(value)
    match = re.search(r'Non-2xx or 3xx responses: (\d+)', output)
    if match:
        result['non2xx'] = int(match.group(1))
    result['errors'] = sum(result[k] for k in ('connect', 'read', 'write', 'timeout', 'non2xx'))
    return result


def _busy_seconds():
    """CPU seconds the whole machine spent busy (all CPUs), from /proc/stat."""
    with open('/proc/stat') as file:
        fields = [int(x) for x in file.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')


def _our_cpu_seconds():
    """CPU seconds used by this process and everything it started."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            cpu = child.cpu_times()
            total += cpu.user + cpu.system + cpu.children_user + cpu.children_system
        except psutil.Error:
            pass
    return total


def run_wrk(port, load, duration, threads=2, server_cpu=None):
    """One wrk cell: parse_wrk's figures, other_cpu_pct, wrk_error if wrk
    failed, and with server_cpu (a Server.cpu_seconds) the server's CPU µs
    per request, all its processes together."""
    path, conns, headers, _, _, tls = LOADS[load]
    argv = ['wrk', f'-t{threads}', f'-c{conns}', f'-d{duration}s', '--latency', '-s',
            os.path.join(BENCH, 'latency.lua'), *(arg for header in headers for arg in ('-H', header)),
            f'{"https" if tls else "http"}://127.0.0.1:{port}{path}']
    env = dict(os.environ, LD_PRELOAD=full_handshake_shim()) if tls and 'Connection: close' in headers else None
    before = server_cpu() if server_cpu else {}
    wall, busy, ours = time.monotonic(), _busy_seconds(), _our_cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, env=env)
    wall, busy, ours = time.monotonic() - wall, _busy_seconds() - busy, _our_cpu_seconds() - ours
    after = server_cpu() if server_cpu else {}
    result = parse_wrk(done.stdout)
    # CPU used by processes the bench did not start (another job on the machine), in % of all CPUs.
    result['other_cpu_pct'] = max(0.0, (busy - ours) / (wall * (os.cpu_count() or 1)) * 100)
    if server_cpu and result['requests']:
        result['server_cpu_us'] = _spent(before, after) / result['requests'] * 1e6
    if done.returncode or not result['requests']:
        result['wrk_error'] = (done.stdout + done.stderr)[-500:]
    return result


def _spent(before, after):
    """CPU seconds spent between two {pid: seconds} snapshots (a process
    started meanwhile counts from 0; one that exited meanwhile is lost)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def full_handshake_shim():
    """The LD_PRELOAD library of fullhandshake.c, compiled once (again when the source is newer)."""
    if not os.path.exists(SHIM) or os.path.getmtime(SHIM) < os.path.getmtime(SHIM_SOURCE):
        os.makedirs(os.path.dirname(SHIM), exist_ok=True)
        subprocess.run(['gcc', '-shared', '-fPIC', '-O2', '-o', SHIM, SHIM_SOURCE], check=True)
    return SHIM


def start_loadgen(processes, workdir, port, conns, duration, path='/', headers=(), name='loadgen', tls=False):
    """bench/loadgen.py as a process under test; its JSON goes to <its log>.json."""
    out = os.path.join(workdir, f'{name}-{time.monotonic_ns()}.json')
    argv = [sys.executable, os.path.join(BENCH, 'loadgen.py'), '--port', port, '--conns', conns,
            '--duration', duration, '--path', path, '--out', out,
            *(arg for header in headers for arg in ('--header', header)), *(['--tls'] if tls else [])]
    process = processes.start(ProcessUnderTest(argv, workdir, name=name))
    process.out = out
    return process


def loadgen_result(process, timeout):
    """Wait for a start_loadgen() process; its JSON output."""
    try:
        process.wait(timeout)
    finally:
        process.stop()
    with open(process.out) as file:
        return json.load(file)


def run_fairness(processes, workdir, port, load, duration):
    """One cell of bench/loadgen.py: how the responses spread over the connections."""
    path, conns, headers, _, _, tls = LOADS[load]
    data = loadgen_result(start_loadgen(processes, workdir, port, conns, duration, path, headers, tls=tls),
                          duration + 30)
    counts = data['per_connection']
    return {'conn_min': min(counts), 'conn_median': statistics.median(counts), 'conn_max': max(counts),
            'conns_unserved': sum(1 for count in counts if count == 0), 'conns': len(counts),
            'jain': jain_index(counts), 'ok': data['ok'], 'failed': len(data['failures'])}


def jain_index(counts):
    """Jain's fairness index of the responses per connection: 1 when every
    connection got as many, 1/n when one got them all (0 when none got any)."""
    total = sum(counts)
    return total * total / (len(counts) * sum(c * c for c in counts)) if total else 0.0
