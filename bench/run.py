#!/usr/bin/env python3
"""zkprefork benchmark: side by side with gunicorn and waitress, on this machine.

    python3 bench/run.py                 # the full run (about 7 minutes on 2 cores)
    python3 bench/run.py --quick         # a smoke run of a few seconds per cell (< 2 minutes)

See bench/README.md.  Results go to bench/RESULTS.md (and bench/reload.png);
raw numbers to bench/results/main.json.  A --quick run writes to
bench/results/tmp/ instead, so it never replaces the committed results.

Everything started here is stopped by pid (and by its own process group) in
a finally, on every path.  All traffic goes to 127.0.0.1.
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RESULTS_DIR = os.path.join(BENCH, 'results')
sys.path.insert(0, BENCH)

WORKERS, THREADS = 2, 4
IDEAL_SLEEP10 = WORKERS * THREADS / 0.010  # 800 req/s

# name -> (path, connections, extra wrk arguments, what it is)
LOADS = {
    'hello-ka16': ('/', 16, [], 'hello world, 16 keep-alive connections'),
    'hello-ka64': ('/', 64, [], 'hello world, 64 keep-alive connections'),
    'hello-ka1000': ('/', 1000, [], 'hello world, 1000 keep-alive connections'),
    'hello-close64': ('/', 64, ['-H', 'Connection: close'], 'hello world, 64 connections, `Connection: close`'),
    'sleep10-ka16': ('/sleep10', 16, [], '10 ms app, 16 keep-alive connections'),
    'sleep10-ka64': ('/sleep10', 64, [], '10 ms app, 64 keep-alive connections'),
}
REFERENCE = 'gunicorn-gthread'
MAIN_SERVERS = ['zkprefork', 'gunicorn-gthread', 'gunicorn-sync', 'waitress']
BUSY_PCT = 5  # other CPU (median of a cell's rounds) above which the machine counts as shared


def log(message):
    print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


# -- installing what the bench needs ---------------------------------------

def ensure_installed(need_zookeeper):
    missing = [pkg for pkg, module in (('gunicorn', 'gunicorn'), ('waitress', 'waitress'),
                                       ('matplotlib', 'matplotlib'), ('psutil', 'psutil'))
               if importlib.util.find_spec(module) is None]
    if importlib.util.find_spec('zkprefork') is None:
        missing.append('-e' + REPO)
    if missing:
        log(f'pip install {" ".join(missing)}')
        subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', *missing])
    apt = []
    if shutil.which('wrk') is None:
        apt.append('wrk')
    if need_zookeeper and not os.path.exists('/usr/share/java/zookeeper.jar'):
        apt.append('zookeeper')
    if apt:
        log(f'apt-get install -y {" ".join(apt)}')
        subprocess.check_call(['apt-get', 'update', '-q'])
        subprocess.check_call(['apt-get', 'install', '-y', '-q', *apt])


# -- the machine -------------------------------------------------------------

def machine_info():
    cpu = 'unknown'
    with open('/proc/cpuinfo') as file:
        for line in file:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    with open('/proc/meminfo') as file:
        mem_kb = int(re.search(r'MemTotal:\s+(\d+)', file.read()).group(1))
    versions = {}
    for dist in ('zkprefork', 'zope.server', 'gunicorn', 'waitress', 'kazoo', 'psutil', 'matplotlib'):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = 'not installed'
    wrk = subprocess.run(['wrk', '--version'], capture_output=True, text=True)
    versions['wrk'] = (wrk.stdout + wrk.stderr).split('[')[0].replace('wrk', '').strip()
    zk = subprocess.run(['dpkg-query', '-W', '-f', '${Version}', 'zookeeper'], capture_output=True, text=True)
    versions['zookeeper (Debian)'] = zk.stdout.strip() or 'not installed'
    try:
        commit = subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'],
                                capture_output=True, text=True).stdout.strip()
        # What is measured is the working tree: say when it is not the commit.
        dirty = bool(subprocess.run(['git', '-C', REPO, 'status', '--porcelain', '--', 'zkprefork'],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = '', False
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'nproc': os.cpu_count(),
        'cpu': cpu,
        'memory_gib': round(mem_kb / 1048576, 1),
        'python': platform.python_version(),
        'kernel': platform.release(),
        'os': _os_name(),
        'versions': versions,
        'commit': commit,
        'dirty': dirty,
    }


def _os_name():
    try:
        with open('/etc/os-release') as file:
            return re.search(r'PRETTY_NAME="([^"]+)"', file.read()).group(1)
    except (OSError, AttributeError):
        return platform.platform()


# -- servers -----------------------------------------------------------------

def child_env():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [BENCH, REPO, env.get('PYTHONPATH')]))
    env['PYTHONUNBUFFERED'] = '1'
    return env


def write_ini(directory, port, workers=WORKERS, threads=THREADS, extra=''):
    path = os.path.join(directory, f'zkprefork-{port}.ini')
    with open(path, 'w') as file:
        file.write('[app:main]\nuse = call:apps:make_app\n\n'
                   '[server:main]\nuse = egg:zkprefork\n'
                   f'host = 127.0.0.1\nport = {port}\nworkers = {workers}\nthreads = {threads}\n'
                   + extra)
    return path


class Server:
    """A server under test, started through Procs; knows when it is ready
    and which pids are its workers."""

    def __init__(self, kind, procs, workdir, port=None, workers=WORKERS, threads=THREADS, ini_extra=''):
        from zkprefork.testing import free_port
        self.kind = kind
        self.procs = procs
        self.port = port or free_port()
        self.workers = workers
        self.threads = threads
        self.workdir = workdir
        self.ini_extra = ini_extra
        self.proc = None

    def argv(self):
        py = sys.executable
        bind = f'127.0.0.1:{self.port}'
        if self.kind == 'zkprefork':
            return [py, '-m', 'zkprefork.cli', write_ini(self.workdir, self.port, self.workers,
                                                         self.threads, self.ini_extra)]
        if self.kind == 'gunicorn-gthread':
            return [py, '-m', 'gunicorn', '-w', str(self.workers), '-k', 'gthread',
                    '--threads', str(self.threads), '-b', bind, 'apps:app']
        if self.kind == 'gunicorn-sync':
            return [py, '-m', 'gunicorn', '-w', str(self.workers), '-k', 'sync', '-b', bind, 'apps:app']
        if self.kind == 'waitress':
            # Single process, so all 8 threads in one; its default connection
            # limit (100) and select() would refuse the 1000-connection load.
            return [py, '-m', 'waitress', f'--threads={self.workers * self.threads}',
                    f'--listen={bind}', '--connection-limit=2000', '--asyncore-use-poll', 'apps:app']
        raise ValueError(self.kind)

    def start(self):
        self.proc = self.procs.start(self.kind, self.argv(), env=child_env(), cwd=self.workdir)
        return self

    def ready(self):
        from procs import http_ok
        if not self.proc.alive():
            raise RuntimeError(f'{self.kind} exited ({self.proc.popen.returncode}):\n{self.proc.log()[-3000:]}')
        text = self.proc.log()
        if self.kind == 'zkprefork':
            up = 'worker(s) ready, serving at' in text
        elif self.kind.startswith('gunicorn'):
            up = text.count('Booting worker with pid') >= self.workers
        else:
            up = 'Serving on' in text
        return up and http_ok(self.port)

    def wait_ready(self, timeout=30):
        from zkprefork.testing import wait_until
        wait_until(self.ready, timeout, interval=0.05, message=f'{self.kind} to serve')
        return self

    def worker_pids(self):
        if self.kind == 'zkprefork':
            return self.proc.titled('zkprefork: worker')
        if self.kind.startswith('gunicorn'):
            return [child.pid for child in self.proc.children()]
        return [self.proc.pid]

    def stop(self):
        if self.proc:
            self.procs.stop(self.proc)


# -- wrk ---------------------------------------------------------------------

_UNITS = {'us': 0.001, 'ms': 1.0, 's': 1000.0, 'm': 60000.0}


def _ms(text):
    value, unit = re.match(r'([\d.]+)(us|ms|s|m)', text).groups()
    return float(value) * _UNITS[unit]


def parse_wrk(output):
    result = {'rps': 0.0, 'requests': 0, 'p50_ms': None, 'p99_ms': None,
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
    import psutil
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            cpu = child.cpu_times()
            total += cpu.user + cpu.system + cpu.children_user + cpu.children_system
        except psutil.Error:
            pass
    return total


def run_wrk(port, load, duration):
    path, conns, extra, _ = LOADS[load]
    argv = ['wrk', '-t2', f'-c{conns}', f'-d{duration}s', '--latency', *extra,
            f'http://127.0.0.1:{port}{path}']
    wall, busy, ours = time.monotonic(), _busy_seconds(), _our_cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    wall, busy, ours = time.monotonic() - wall, _busy_seconds() - busy, _our_cpu_seconds() - ours
    result = parse_wrk(done.stdout)
    # CPU used by processes the bench did not start (another job on the machine), in % of all CPUs.
    result['other_cpu_pct'] = max(0.0, (busy - ours) / (wall * (os.cpu_count() or 1)) * 100)
    if done.returncode or not result['requests']:
        result['wrk_error'] = (done.stdout + done.stderr)[-500:]
    return result


# -- throughput --------------------------------------------------------------

def throughput(procs, workdir, servers, loads, rounds, duration, memory_after=True):
    """Interleaved: every round starts every server afresh, then for each
    load runs wrk against A, B, C, ... in turn."""
    cells = {server: {load: [] for load in loads} for server in servers}
    memory = {}
    for rnd in range(rounds):
        log(f'round {rnd + 1}/{rounds}: starting {", ".join(servers)}')
        running = {name: Server(name, procs, workdir).start() for name in servers}
        try:
            for server in running.values():
                server.wait_ready()
            time.sleep(0.5)
            for load in loads:
                for name in servers:
                    result = run_wrk(running[name].port, load, duration)
                    cells[name][load].append(result)
                    log(f'  {load:14s} {name:28s} {result["rps"]:9.0f} req/s  p99 {result["p99_ms"]} ms  '
                        f'errors {result["errors"]}  other CPU {result["other_cpu_pct"]:.0f}%' + ('  WRK: ' + result['wrk_error'][-200:]
                                                         if 'wrk_error' in result else ''))
                    time.sleep(1.0 if LOADS[load][1] >= 1000 else 0.3)
            if memory_after and rnd == rounds - 1:
                for name, server in running.items():
                    memory[name] = memory_of(server.worker_pids())
        finally:
            for server in running.values():
                server.stop()
    return cells, memory


def memory_of(pids):
    import psutil
    rows = []
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rows.append({'pid': pid, 'rss': info.rss, 'uss': info.uss, 'pss': info.pss})
    return rows


def summarize(cells):
    summary = {}
    for server, loads in cells.items():
        summary[server] = {}
        for load, runs in loads.items():
            if not runs:
                continue
            rps = [r['rps'] for r in runs]
            summary[server][load] = {
                'rps': statistics.median(rps),
                'rps_min': min(rps), 'rps_max': max(rps),
                'p50_ms': _median([r['p50_ms'] for r in runs]),
                'p99_ms': _median([r['p99_ms'] for r in runs]),
                'p99_max_ms': max((r['p99_ms'] for r in runs if r['p99_ms'] is not None), default=None),
                'errors': sum(r['errors'] for r in runs),
                'socket_errors': {k: sum(r[k] for r in runs) for k in ('connect', 'read', 'write', 'timeout')},
                'non2xx': sum(r['non2xx'] for r in runs),
                'rounds': len(runs),
                'other_cpu_pct': _median([r.get('other_cpu_pct') for r in runs]),
                'other_cpu_max_pct': max((r.get('other_cpu_pct') or 0 for r in runs), default=None),
            }
    return summary


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- memory with and without preload ------------------------------------------

def memory_preload(procs, workdir, warm_seconds):
    return {label: _memory(procs, workdir, warm_seconds, extra)
            for label, extra in (('preload = false', ''), ('preload = true', 'preload = true\n'))}


def _memory(procs, workdir, warm_seconds, extra):
    server = Server('zkprefork', procs, workdir, ini_extra=extra).start()
    try:
        server.wait_ready()
        run_wrk(server.port, 'hello-ka16', warm_seconds)
        run_wrk(server.port, 'sleep10-ka16', 1)
        time.sleep(0.3)
        return {'workers': memory_of(server.worker_pids()),
                'master': memory_of([server.proc.pid])}
    finally:
        server.stop()


# -- rolling reload under load -------------------------------------------------

def reload_under_load(procs, workdir, duration, hup_at, png_path):
    server = Server('zkprefork', procs, workdir, workers=4, threads=4).start()
    out_file = os.path.join(workdir, 'loadgen.json')
    try:
        server.wait_ready()
        load = procs.start('loadgen', [sys.executable, os.path.join(BENCH, 'loadgen.py'),
                                       '--port', str(server.port), '--conns', '48',
                                       '--duration', str(duration), '--out', out_file],
                           env=child_env())
        started = time.monotonic()
        hups = []
        for at in hup_at:
            time.sleep(max(0.0, started + at - time.monotonic()))
            hups.append((time.monotonic(), time.time()))
            os.kill(server.proc.pid, signal.SIGHUP)
        try:
            load.popen.wait(duration + 60)
        finally:
            procs.stop(load)
        with open(out_file) as file:
            data = json.load(file)
        text = server.proc.log()
    finally:
        server.stop()
    retired = [_log_time(line) for line in text.splitlines()
               if 'retiring worker' in line and 'reloaded' in line]
    completions = []
    for _, wall in hups:
        after = sorted(t for t in retired if t is not None and t >= wall - 0.01)[:4]
        completions.append(round(after[-1] - wall, 3) if len(after) == 4 else None)
    hup_offsets = [round(mono - data['start'], 3) for mono, _ in hups]
    _plot_reload(data, hup_offsets, png_path)
    per_second = [c / data['bucket'] for c in data['per_bucket']]
    steady = [v for i, v in enumerate(per_second) if 1.0 <= i * data['bucket'] < hup_offsets[0] - 0.1]
    return {
        'ok': data['ok'], 'failed': len(data['failures']), 'failures': data['failures'][:20],
        'reconnects': data['reconnects'], 'hups_at_s': hup_offsets,
        'reload_completed_s': completions, 'duration_s': duration,
        'steady_rps': statistics.median(steady) if steady else None,
        'min_bucket_rps_after_hup': min(per_second[int(hup_offsets[0] / data['bucket']):
                                                   int(duration / data['bucket']) - 1] or [0]),
    }


def _log_time(line):
    match = re.match(r'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})', line)
    if not match:
        return None
    stamp = datetime.datetime.strptime(match.group(1), '%Y-%m-%d %H:%M:%S')
    return stamp.timestamp() + int(match.group(2)) / 1000


def _plot_reload(data, hup_offsets, png_path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    bucket = data['bucket']
    counts = data['per_bucket'][:-1]  # the last bucket is cut short by the end of the load
    xs = [i * bucket for i in range(len(counts))]
    ys = [c / bucket for c in counts]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(xs, ys, drawstyle='steps-post', linewidth=1.2, label='responses/s (100 ms buckets)')
    for i, at in enumerate(hup_offsets):
        ax.axvline(at, color='red', linestyle='--', label='SIGHUP to the master' if i == 0 else None)
    for when, _ in data['failures']:
        ax.axvline(when - data['start'], color='black', alpha=0.3, linewidth=0.8)
    ax.set_xlabel('seconds since the load started')
    ax.set_ylabel('requests/s')
    ax.set_ylim(bottom=0)
    ax.set_title(f'zkprefork, 4 workers x 4 threads, rolling reload under load: '
                 f'{data["ok"]} ok, {len(data["failures"])} failed')
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# -- ZooKeeper: registration and deregistration latencies ---------------------

def zookeeper_latencies(procs, workdir, trials):
    from kazoo.client import KazooClient
    from zkprefork.testing import ZooKeeperServer, free_port, wait_until
    import logging
    logging.getLogger('kazoo').setLevel(logging.ERROR)  # its reconnect chatter is not a result
    # ZooKeeper's own default tick (2 s): the 10 s session below is not capped.
    zk = ZooKeeperServer(tick_time=2000)
    client = KazooClient(hosts=zk.hosts)
    results = {'start_registered_s': [], 'sigterm_gone_s': [], 'sigkill_gone_s': [],
               'workers_gone_after_sigkill_s': [], 'workers_in_node': []}
    try:
        zk.start()
        client.start(30)
        # A fresh server may drop its very first sessions while it finishes
        # starting: make sure it takes writes before timing anything.
        client.ensure_path('/bench')
        client.create('/bench/warm-up', ephemeral=True, sequence=True)
        time.sleep(0.5)
        for trial, how in enumerate(['SIGTERM', 'SIGKILL'] * trials):
            port = free_port()
            path = f'/bench/run-{os.getpid()}-{trial}/providers'
            node = f'{path}/127.0.0.1:{port}'
            client.ensure_path(path)
            events = {}
            ev_created, ev_deleted = threading.Event(), threading.Event()

            def on_created(event, events=events, ev=ev_created):
                events.setdefault('created', time.monotonic())
                ev.set()

            def on_deleted(event, events=events, ev=ev_deleted):
                events.setdefault('deleted', time.monotonic())
                ev.set()
            if client.exists(node, watch=on_created):
                raise RuntimeError(f'{node} exists before the start')
            server = Server('zkprefork', procs, workdir, port=port, workers=4, threads=4,
                            ini_extra=f'zookeeper = {zk.hosts}\npath = {path}\nsession_timeout = 10000\n')
            t0 = time.monotonic()
            server.start()
            try:
                if not ev_created.wait(30):
                    raise RuntimeError(f'zkprefork did not register:\n{server.proc.log()[-2000:]}')
                results['start_registered_s'].append(events['created'] - t0)
                data = json.loads(client.get(node)[0])
                results['workers_in_node'].append(data.get('workers'))
                wait_until(lambda: len(server.worker_pids()) == 4, 10, message='4 workers')
                time.sleep(0.3)
                if not client.exists(node, watch=on_deleted):
                    raise RuntimeError('the node went away by itself')
                workers = server.worker_pids()
                server.proc.children()  # remember every pid before the kill
                t0 = time.monotonic()
                os.kill(server.proc.pid, signal.SIGTERM if how == 'SIGTERM' else signal.SIGKILL)
                if not ev_deleted.wait(30):
                    raise RuntimeError(f'the node stayed after {how}')
                gone = events['deleted'] - t0
                if how == 'SIGTERM':
                    results['sigterm_gone_s'].append(gone)
                    server.proc.popen.wait(30)
                else:
                    results['sigkill_gone_s'].append(gone)
                    import psutil

                    def workers_gone():
                        return not any(psutil.pid_exists(pid) and _not_zombie(pid) for pid in workers)
                    try:
                        wait_until(workers_gone, 10, interval=0.005, message='orphaned workers to exit')
                        results['workers_gone_after_sigkill_s'].append(time.monotonic() - t0)
                    except AssertionError:  # timed out
                        results['workers_gone_after_sigkill_s'].append(None)
                log(f'  ZooKeeper trial {trial + 1}: start->registered {results["start_registered_s"][-1]*1000:.0f} ms, '
                    f'{how}->node gone {gone*1000:.1f} ms')
            finally:
                server.stop()
    finally:
        client.stop()
        client.close()
        zk.stop()
        shutil.rmtree(zk.directory, ignore_errors=True)
    return results


def _not_zombie(pid):
    try:
        with open(f'/proc/{pid}/stat') as file:
            return file.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


# -- report ------------------------------------------------------------------

EXPERIMENTS = os.path.join(BENCH, 'experiments', 'NOTES.md')


def render(path, main, png_name):
    lines = ['# zkprefork benchmark results', '']
    if main:
        lines += _render_main(main, png_name)
    # The record of the changes measured on the way (written by hand, not re-measured).
    with open(EXPERIMENTS) as file:
        lines += [file.read().strip(), '']
    with open(path, 'w') as file:
        file.write('\n'.join(lines) + '\n')


def _machine_lines(machine, settings):
    v = machine['versions']
    return [
        f'Measured {machine["date"]} on {machine["nproc"]} CPU(s) `{machine["cpu"]}`, '
        f'{machine["memory_gib"]} GiB, {machine["os"]} (Linux {machine["kernel"]}), '
        f'Python {machine["python"]}; zkprefork {v["zkprefork"]} (commit {machine["commit"]}'
        f'{" + uncommitted changes to zkprefork/" if machine.get("dirty") else ""}), '
        f'zope.server {v["zope.server"]}, gunicorn {v["gunicorn"]}, waitress {v["waitress"]}, '
        f'kazoo {v["kazoo"]}, wrk {v["wrk"]}, ZooKeeper {v["zookeeper (Debian)"]}.',
        '',
        f'Command: `{settings["command"]}` — {settings["rounds"]} interleaved round(s) of '
        f'{settings["duration"]} s per cell (every round starts each server afresh, then for every load runs '
        'wrk against each server in turn: A, B, C, A, B, C …). `wrk -t2 -c N -d D --latency` on '
        '127.0.0.1; req/s is the median over rounds, p50/p99 the median of the rounds\' percentiles, '
        'errors the sum over rounds of wrk\'s connect/read/write/timeout errors and non-2xx/3xx responses. '
        '"Other CPU" is the CPU time used during the cell by processes the bench did not start (from /proc/stat '
        'minus the bench\'s own process tree), in % of all CPUs: anything above a few % means another job '
        'shared the machine and that cell is noisy.',
        '',
    ]


def _fmt(value, digits=1):
    if value is None:
        return '–'
    return f'{value:.{digits}f}'


def _throughput_table(summary, servers, loads, reference=REFERENCE):
    lines = ['| load | server | req/s (median) | min–max | p50 ms | p99 ms | errors | × gunicorn gthread '
             '| other CPU % (median/max) |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for load in loads:
        ref = summary.get(reference, {}).get(load)
        for server in servers:
            cell = summary.get(server, {}).get(load)
            if not cell:
                continue
            ratio = cell['rps'] / ref['rps'] if ref and ref['rps'] else None
            errors = str(cell['errors'])
            if cell['errors']:
                kinds = {**cell['socket_errors'], 'non2xx': cell['non2xx']}
                errors += ' (' + ', '.join(f'{k} {n}' for k, n in kinds.items() if n) + ')'
            name = f'**{server}**' if server.startswith('zkprefork') else server
            lines.append(f'| {load} | {name} | {cell["rps"]:.0f} | {cell["rps_min"]:.0f}–{cell["rps_max"]:.0f} | '
                         f'{_fmt(cell["p50_ms"], 2)} | {_fmt(cell["p99_ms"], 2)} | {errors} | {_fmt(ratio, 2)} | '
                         f'{_fmt(cell.get("other_cpu_pct"), 0)}/{_fmt(cell.get("other_cpu_max_pct"), 0)} |')
    return lines


def _other_cpu_note(summary):
    """One line on how much the machine was shared during the throughput cells."""
    cells = [(server, load, cell['other_cpu_pct']) for server, loads in summary.items()
             for load, cell in loads.items() if cell.get('other_cpu_pct') is not None]
    if not cells:
        return []
    busy = [f'{load} {server} ({pct:.0f}%)' for server, load, pct in cells if pct > BUSY_PCT]
    worst = max(pct for _, _, pct in cells)
    if not busy:
        return ['', f'Other CPU: no cell above {BUSY_PCT}% (median per cell; largest {worst:.0f}%): '
                'the machine was not shared during the throughput cells.']
    return ['', f'**The machine was shared**: other CPU above {BUSY_PCT}% (median over rounds) in '
            f'{len(busy)} of {len(cells)} cells: {", ".join(busy)}. Those cells are noisy.']


def _slow_rounds_note(cells):
    """The rounds of the 10 ms app in which zkprefork fell below 95% of the ideal:
    the medians can hide them."""
    slow = [f'{load} round {i + 1}: {run["rps"]:.0f} req/s (other CPU {run.get("other_cpu_pct") or 0:.0f}%)'
            for load, runs in cells.items() if LOADS[load][0] == '/sleep10'
            for i, run in enumerate(runs) if run['rps'] < 0.95 * IDEAL_SLEEP10]
    if not slow:
        return []
    return ['', f'zkprefork rounds of the 10 ms app below 95% of {IDEAL_SLEEP10:.0f} req/s: {"; ".join(slow)}. '
            'Near 400 req/s (one worker\'s 4 threads / 10 ms) means that one worker took (nearly) all of '
            'wrk\'s connections when they opened, and the 10 ms app ran on its threads only: the workers '
            'accept from one socket, with no balancing between them (see Experiments, `bal`).']


def targets(main):
    s = main['summary']
    zk, ref = s.get('zkprefork', {}), s.get(REFERENCE, {})
    rows = []

    def ratio(load):
        if load in zk and load in ref and ref[load]['rps']:
            return zk[load]['rps'] / ref[load]['rps']
        return None

    def add(name, measured, ok):
        rows.append((name, measured, None if ok is None else bool(ok)))
    r64, r16 = ratio('hello-ka64'), ratio('hello-ka16')
    add('hello 2×4, 64 keep-alive: ≥ 2.0× gunicorn gthread req/s', f'{_fmt(r64, 2)}×', r64 and r64 >= 2.0)
    add('hello 2×4, 16 keep-alive: ≥ 1.5× gunicorn gthread req/s', f'{_fmt(r16, 2)}×', r16 and r16 >= 1.5)
    for load in ('hello-ka16', 'hello-ka64'):
        if load in zk and load in ref:
            a, b = zk[load]['p99_ms'], ref[load]['p99_ms']
            add(f'{load}: p99 ≤ gunicorn gthread\'s', f'{_fmt(a, 2)} ms vs {_fmt(b, 2)} ms',
                a is not None and b is not None and a <= b)
    if 'sleep10-ka64' in zk:
        rps = zk['sleep10-ka64']['rps']
        add(f'10 ms app, 64 keep-alive: ≥ 95% of {IDEAL_SLEEP10:.0f} req/s',
            f'{rps:.0f} req/s ({rps / IDEAL_SLEEP10 * 100:.1f}%)', rps >= 0.95 * IDEAL_SLEEP10)
    if 'sleep10-ka16' in zk:
        rps = zk['sleep10-ka16']['rps']
        add(f'(also) 10 ms app, 16 keep-alive: ≥ 95% of {IDEAL_SLEEP10:.0f} req/s',
            f'{rps:.0f} req/s ({rps / IDEAL_SLEEP10 * 100:.1f}%)', rps >= 0.95 * IDEAL_SLEEP10)
    if 'hello-ka1000' in zk:
        cell = zk['hello-ka1000']
        add('1000 keep-alive connections on 2 workers all served (no errors, no timeouts)',
            f'{cell["errors"]} errors ({cell["socket_errors"]["timeout"]} timeouts) in {cell["rounds"]} round(s)',
            cell['errors'] == 0)
    reload = main.get('reload')
    if reload:
        add('zero failed requests across a HUP under load',
            f'{reload["failed"]} failed of {reload["ok"] + reload["failed"]}', reload['failed'] == 0)
    zkl = main.get('zookeeper')
    if zkl:
        def worst(key):
            values = [v for v in zkl[key] if v is not None]
            return max(values) if values else None
        w = worst('sigterm_gone_s')
        add('SIGTERM → node gone ≤ 50 ms (worst trial)', f'{_fmt(w and w * 1000, 1)} ms', w is not None and w <= 0.050)
        w = worst('sigkill_gone_s')
        add('master SIGKILL → node gone ≤ 1 s (worst trial)', f'{_fmt(w and w * 1000, 0)} ms', w is not None and w <= 1.0)
        w = worst('start_registered_s')
        add('start → registered with 4 workers ≤ 1 s (worst trial)', f'{_fmt(w and w * 1000, 0)} ms',
            w is not None and w <= 1.0)
    mem = main.get('memory_preload', {}).get('preload = true')
    if mem:
        uss = max(w['uss'] for w in mem['workers']) / 1048576
        add('per-worker USS with preload ≤ 6 MB (largest worker)', f'{uss:.1f} MiB', uss <= 6.0)
    return rows


def _render_main(main, png_name):
    lines = ['## Side by side', ''] + _machine_lines(main['machine'], main['settings'])
    lines += ['Servers: **zkprefork** 2 workers × 4 threads (`python -m zkprefork.cli INI`), '
              'gunicorn gthread `-w 2 -k gthread --threads 4`, gunicorn sync `-w 2`, '
              'waitress `--threads=8` (one process; `--connection-limit=2000 --asyncore-use-poll` so that it '
              'can take 1000 connections at all). Apps: bench/apps.py (hello world with Content-Length; '
              '`/sleep10` blocks 10 ms in time.sleep).', '']
    lines += ['### Targets', '', '| target | measured | pass |', '|---|---|---|']
    for name, measured, ok in targets(main):
        lines.append(f'| {name} | {measured} | {"–" if ok is None else ("PASS" if ok else "**FAIL**")} |')
    lines += ['', '### Throughput and latency', '']
    lines += _throughput_table(main['summary'], main['settings']['servers'], main['settings']['loads'])
    lines += _other_cpu_note(main['summary'])
    lines += _slow_rounds_note(main.get('cells', {}).get('zkprefork', {}))
    if main.get('reload'):
        lines += [''] + _render_reload(main['reload'], png_name)
    zkl = main.get('zookeeper')
    if zkl:
        def ms(values):
            return ', '.join('–' if v is None else f'{v * 1000:.1f}' for v in values)
        lines += ['### ZooKeeper', '',
                  'Debian\'s ZooKeeper on 127.0.0.1; zkprefork 4 workers with `zookeeper` and `path`; a kazoo '
                  'client watches the node (`exists(watch=...)`) and the time is taken when the watch fires.', '',
                  '| measure | trials (ms) |', '|---|---|',
                  f'| Popen → node created (4 workers ready) | {ms(zkl["start_registered_s"])} |',
                  f'| SIGTERM to the master → node deleted | {ms(zkl["sigterm_gone_s"])} |',
                  f'| SIGKILL to the master → node deleted | {ms(zkl["sigkill_gone_s"])} |',
                  f'| SIGKILL to the master → every orphaned worker exited | {ms(zkl["workers_gone_after_sigkill_s"])} |',
                  f'| `workers` in the node data | {", ".join(str(w) for w in zkl["workers_in_node"])} |', '']
    if main.get('memory_preload'):
        lines += _render_memory(main['memory_preload'], main.get('memory_after_load', {}))
    lines += [f'Total bench time: {main["elapsed_s"] / 60:.1f} min.', '']
    return lines


def _render_reload(reload, png_name):
    lines = ['### Rolling reload under load', '',
             'zkprefork 4 workers × 4 threads, hello world, bench/loadgen.py with 48 keep-alive connections '
             f'for {reload["duration_s"]} s, SIGHUP to the master at '
             f'{", ".join(f"{t:.1f}" for t in reload["hups_at_s"])} s.',
             '',
             f'- responses: {reload["ok"]} ok, **{reload["failed"]} failed**; '
             f'{reload["reconnects"]} reconnects after `Connection: close` from draining workers',
             f'- steady state before the HUP: {_fmt(reload["steady_rps"], 0)} req/s (median of 100 ms buckets); '
             f'lowest 100 ms bucket after it: {_fmt(reload["min_bucket_rps_after_hup"], 0)} req/s',
             '- all 4 old workers retired (replacement ready) within: '
             + ', '.join(f'{_fmt(c, 2)} s' for c in reload['reload_completed_s']) + ' of the HUP',
             '', f'![requests per second across the HUP]({png_name})', '']
    if reload['failures']:
        lines += ['First failures (monotonic time, error):', '', '```']
        lines += [f'{t:.3f} {e}' for t, e in reload['failures']]
        lines += ['```', '']
    return lines


def _render_memory(mem, after_load):
    lines = ['### Memory per worker', '',
             'psutil `memory_full_info()` after a short hello-world and 10 ms load (2 workers × 4 threads). '
             'USS = memory private to the process; PSS = shared pages split among their users.', '',
             '| server | process | RSS MiB | PSS MiB | USS MiB |', '|---|---|---:|---:|---:|']
    for label, rows in mem.items():
        for role in ('master', 'workers'):
            for row in rows[role]:
                lines.append(f'| zkprefork, {label} | {"worker" if role == "workers" else role} {row["pid"]} | '
                             f'{row["rss"] / 1048576:.1f} | {row["pss"] / 1048576:.1f} | {row["uss"] / 1048576:.1f} |')
    for server, rows in after_load.items():
        for row in rows:
            lines.append(f'| {server} (after the last round) | worker {row["pid"]} | {row["rss"] / 1048576:.1f} | '
                         f'{row["pss"] / 1048576:.1f} | {row["uss"] / 1048576:.1f} |')
    lines.append('')
    return lines


# -- main --------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description='zkprefork vs gunicorn vs waitress, interleaved.')
    parser.add_argument('--quick', action='store_true', help='a smoke run: 1 round, 2 s per cell')
    parser.add_argument('--rounds', type=int, help='interleaved rounds (default 3, --quick 1)')
    parser.add_argument('--duration', type=int, help='seconds of wrk per cell (default 5, --quick 2)')
    parser.add_argument('--servers', help='comma separated servers (default: all four)')
    parser.add_argument('--loads', help=f'comma separated loads (default: all of {", ".join(LOADS)})')
    parser.add_argument('--render', action='store_true',
                        help='only write RESULTS.md again from bench/results/main.json (no measurement)')
    parser.add_argument('--keep', action='store_true', help='keep the logs of every process (bench/results/tmp/)')
    parser.add_argument('--skip', default='', help='comma separated parts to skip: throughput,reload,zookeeper,memory')
    args = parser.parse_args()

    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    duration = args.duration or (2 if quick else 5)
    skip = set(filter(None, args.skip.split(',')))
    servers = args.servers.split(',') if args.servers else MAIN_SERVERS
    loads = args.loads.split(',') if args.loads else list(LOADS)

    out_dir = os.path.join(RESULTS_DIR, 'tmp') if quick else RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    if args.render:
        write_results(out_dir, quick)
        return 0
    os.makedirs(os.path.join(RESULTS_DIR, 'tmp'), exist_ok=True)
    ensure_installed(need_zookeeper='zookeeper' not in skip)
    from procs import Procs

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    # Explicitly: a shell's background job starts with SIGINT ignored, and
    # SIGTERM would end the bench without its finally (and leave servers running).
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    workdir = tempfile.mkdtemp(prefix='zkprefork-bench-', dir=os.path.join(RESULTS_DIR, 'tmp'))
    procs = Procs(workdir)
    began = time.monotonic()
    command = 'python3 bench/run.py' + ' '.join([''] + sys.argv[1:])
    result = {'machine': machine_info(), 'name': 'main',
              'settings': {'rounds': rounds, 'duration': duration, 'servers': servers, 'loads': loads,
                           'command': command, 'quick': quick}}
    png_name = 'reload-quick.png' if quick else 'reload.png'
    png_path = os.path.join(out_dir if quick else BENCH, png_name)
    log(f'bench: {command}; logs in {workdir}')
    try:
        if 'throughput' not in skip:
            cells, memory = throughput(procs, workdir, servers, loads, rounds, duration)
            result['cells'] = cells
            result['summary'] = summarize(cells)
            result['memory_after_load'] = memory
        else:
            result['summary'] = {}
        if 'reload' not in skip:
            log('rolling reload under load')
            result['reload'] = reload_under_load(procs, workdir, 6 if quick else 12,
                                                 [2.5] if quick else [3.0, 7.5], png_path)
            log(f'  reload: {result["reload"]["ok"]} ok, {result["reload"]["failed"]} failed')
        if 'zookeeper' not in skip:
            log('ZooKeeper latencies')
            result['zookeeper'] = zookeeper_latencies(procs, workdir, 1 if quick else 3)
        if 'memory' not in skip:
            log('memory per worker, with and without preload')
            result['memory_preload'] = memory_preload(procs, workdir, 1 if quick else 2)
    finally:
        procs.stop_all()
    result['elapsed_s'] = time.monotonic() - began

    with open(os.path.join(out_dir, 'main.json'), 'w') as file:
        json.dump(result, file, indent=1)
    results_md, main_data = write_results(out_dir, quick)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f'done in {result["elapsed_s"] / 60:.1f} min: {results_md}')
    print()
    for name, measured, ok in targets(main_data):
        print(f'{"PASS" if ok else "FAIL" if ok is not None else "    "}  {name}: {measured}')
    return 0


def write_results(out_dir, quick):
    main_data = _load(os.path.join(out_dir, 'main.json'))
    results_md = os.path.join(out_dir if quick else BENCH, 'RESULTS-quick.md' if quick else 'RESULTS.md')
    render(results_md, main_data, 'reload-quick.png' if quick else 'reload.png')
    return results_md, main_data


def _load(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


if __name__ == '__main__':
    sys.exit(main())
