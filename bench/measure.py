"""What the bench measures, each a function that starts what it needs
through a zkprefork.testing.Processes and returns plain data (JSON-able):

    throughput            interleaved rounds of wrk (and of loadgen, for
                          fairness) against every server, every load
    summarize             the medians of those rounds, per server and load
    memory_preload        zkprefork's memory per worker, with and without preload
    reload_under_load     zkprefork's rolling reload (SIGHUP) or live
                          upgrade (SIGUSR2) under load
    slow_pairs            two concurrent slow requests: on two workers?
    retiring_under_idle_clients
                          HUP, TTOU and max_requests under clients that
                          idle between requests on kept connections
    zookeeper_latencies   start -> registered, SIGTERM/SIGKILL -> node gone

`log` prints progress lines with the time.
"""
import datetime
import http.client
import json
import logging
import os
import re
import signal
import statistics
import threading
import time

import psutil

from loads import LOADS, loadgen_result, run_fairness, run_wrk, start_loadgen
from servers import THREADS, TLS_KINDS, WORKERS, Server, make_certificates
from zkprefork.testing import IdleClients, ZooKeeperServer, free_port, kill_pids, wait_until

IDEAL_SLEEP10 = WORKERS * THREADS / 0.010  # req/s of the 10 ms app, 800 on 2 workers × 4 threads


def log(message):
    print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


# -- throughput --------------------------------------------------------------

def throughput(processes, workdir, servers, loads, rounds, duration, wrk_threads=2, fairness_duration=0,
               memory_after=True):
    """Interleaved: every round starts every server afresh, then for each
    load runs wrk against A, B, C, ... in turn (each followed, with
    fairness_duration > 0, by a loadgen cell of that many seconds). Loads
    that need another app or TLS (Load.app, Load.tls) are served by servers
    started for them, in the same round; a server kind without TLS is left
    out of the TLS loads. Returns ({server: {load: [cell per round]}},
    {server: memory rows})."""
    cells = {server: {load: [] for load in loads} for server in servers}
    memory = {}
    groups = {}  # (app, tls) -> its loads, in the order given
    for load in loads:
        groups.setdefault((LOADS[load].app, LOADS[load].tls), []).append(load)
    tls_files = make_certificates(workdir) if any(tls for _, tls in groups) else None
    for rnd in range(rounds):
        for (app, tls), group in groups.items():
            kinds = [name for name in servers if not tls or name in TLS_KINDS]
            log(f'round {rnd + 1}/{rounds}: starting {", ".join(kinds)} ({app}{", TLS" if tls else ""})')
            running = {name: Server(name, processes, workdir, app=app, tls=tls_files if tls else None)
                       for name in kinds}
            try:
                _round(processes, workdir, running, group, cells, duration, wrk_threads, fairness_duration)
                if memory_after and rnd == rounds - 1:
                    memory.update({name: memory_of(server.worker_pids()) for name, server in running.items()})
            finally:
                for server in running.values():
                    server.stop()
    return cells, memory


def _round(processes, workdir, running, loads, cells, duration, wrk_threads, fairness_duration):
    """One round of `loads` against the `running` servers ({name: Server}), each server in turn."""
    for server in running.values():
        server.start()
    for server in running.values():
        server.wait_ready()
    time.sleep(0.5)  # let the servers settle after their start
    for load in loads:
        for name, server in running.items():
            result = run_cell(processes, workdir, server, load, duration, wrk_threads, fairness_duration)
            cells[name][load].append(result)
            log(f'  {load:17s} {name:18s} ' + describe_cell(result))


def run_cell(processes, workdir, server, load, duration, wrk_threads, fairness_duration):
    result = run_wrk(server.port, load, duration, wrk_threads, server.cpu_seconds)
    pause = 1.0 if LOADS[load].conns >= 1000 else 0.3  # the previous cell's connections close
    time.sleep(pause)
    if fairness_duration:
        result['fairness'] = run_fairness(processes, workdir, server.port, load, fairness_duration)
        time.sleep(pause)
    return result


def describe_cell(result):
    text = (f'{result["rps"]:9.0f} req/s  p99 {result["p99_ms"]} ms  p99.9 {result.get("p999_ms")} ms  '
            f'CPU {result.get("server_cpu_us", 0):.0f} µs/req  errors {result["errors"]}  '
            f'other CPU {result["other_cpu_pct"]:.0f}%')
    fairness = result.get('fairness')
    if fairness:
        text += (f'  per connection: min {fairness["conn_min"]}, '
                 f'{fairness["conns_unserved"]}/{fairness["conns"]} unserved, Jain {fairness["jain"]:.2f}')
    if 'wrk_error' in result:
        text += '  WRK: ' + result['wrk_error'][-200:]
    return text


def memory_of(pids):
    """RSS, USS and PSS (bytes) of each pid."""
    rows = []
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rows.append({'pid': pid, 'rss': info.rss, 'uss': info.uss, 'pss': info.pss})
    return rows


def summarize(cells):
    """{server: {load: medians over rounds, ranges, summed errors, fairness}}."""
    summary = {}
    for server, loads in cells.items():
        summary[server] = {}
        for load, runs in loads.items():
            if runs:
                summary[server][load] = _summarize_runs(runs)
    return summary


def _summarize_runs(runs):
    rps = [r['rps'] for r in runs]
    summary = {
        'rps': statistics.median(rps),
        'rps_min': min(rps), 'rps_max': max(rps),
        'p50_ms': _median([r['p50_ms'] for r in runs]),
        'p99_ms': _median([r['p99_ms'] for r in runs]),
        'p999_ms': _median([r.get('p999_ms') for r in runs]),
        'server_cpu_us': _median([r.get('server_cpu_us') for r in runs]),
        'p99_max_ms': max((r['p99_ms'] for r in runs if r['p99_ms'] is not None), default=None),
        'errors': sum(r['errors'] for r in runs),
        'socket_errors': {k: sum(r[k] for r in runs) for k in ('connect', 'read', 'write', 'timeout')},
        'non2xx': sum(r['non2xx'] for r in runs),
        'rounds': len(runs),
        'other_cpu_pct': _median([r.get('other_cpu_pct') for r in runs]),
        'other_cpu_max_pct': max((r.get('other_cpu_pct') or 0 for r in runs), default=None),
    }
    fairness = [r['fairness'] for r in runs if r.get('fairness')]
    if fairness:  # the worst round: one unfair round is what a client would see
        summary['fairness'] = {'conn_min': min(f['conn_min'] for f in fairness),
                               'conns_unserved': max(f['conns_unserved'] for f in fairness),
                               'jain': min(f['jain'] for f in fairness),
                               'conns': fairness[0]['conns'],
                               'failed': sum(f['failed'] for f in fairness)}
    return summary


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- memory with and without preload ------------------------------------------

def memory_preload(processes, workdir, warm_seconds):
    return {label: _memory(processes, workdir, warm_seconds, extra)
            for label, extra in (('preload = false', ''), ('preload = true', 'preload = true\n'))}


def _memory(processes, workdir, warm_seconds, extra):
    server = Server('zkprefork', processes, workdir, ini_extra=extra).start()
    try:
        server.wait_ready()
        run_wrk(server.port, 'hello-ka16', warm_seconds)
        run_wrk(server.port, 'sleep10-ka16', 1)
        time.sleep(0.3)  # the last responses are flushed and the workers idle
        return {'workers': memory_of(server.worker_pids()),
                'master': memory_of([server.proc.pid])}
    finally:
        server.stop()


# -- rolling reload and live upgrade under load -------------------------------

NEW_MASTER = r'zkprefork\.master\[{old}\] SIGUSR2: upgrading: started a new master \(pid (\d+)\)'


def reload_under_load(processes, workdir, duration, signal_at, signum=signal.SIGHUP):
    """zkprefork 4 × 4 under bench/loadgen.py (48 connections for duration s),
    `signum` to the master at each of signal_at (s after the load started):
    SIGHUP, a rolling reload; SIGUSR2, a live upgrade. Each USR2 goes to the
    master serving then (the previous upgrade's new master, once the old one
    has exited); the last new master is stopped by its pid at the end."""
    server = Server('zkprefork', processes, workdir, workers=4, threads=4).start()
    masters = [server.proc.pid]  # the old master of each upgrade, then the one serving at the end
    try:
        server.wait_ready()
        load = start_loadgen(processes, workdir, server.port, 48, duration)
        started = time.monotonic()
        sent = []
        for at in signal_at:
            time.sleep(max(0.0, started + at - time.monotonic()))  # the scenario's schedule
            sent.append((time.monotonic(), time.time()))
            if masters[-1] == server.proc.pid:
                server.proc.signal(signum)  # the bench's child: never another process's pid
            else:
                os.kill(masters[-1], signum)
            if signum == signal.SIGUSR2:
                masters.append(_upgraded(server.proc, masters[-1]))
        data = loadgen_result(load, duration + 60)
        text = server.proc.log()
    finally:
        if masters[-1] != server.proc.pid:
            _stop_master(masters[-1])
        server.stop()
    offsets = [round(mono - data['start'], 3) for mono, _ in sent]
    per_second = [c / data['bucket'] for c in data['per_bucket']]
    steady = [v for i, v in enumerate(per_second) if 1.0 <= i * data['bucket'] < offsets[0] - 0.1]
    result = {
        'signal': signal.Signals(signum).name,
        'ok': data['ok'], 'failed': len(data['failures']), 'failures': data['failures'][:20],
        'failure_offsets_s': [round(t - data['start'], 3) for t, _ in data['failures'][:1000]],
        'bucket': data['bucket'], 'per_bucket': data['per_bucket'],
        'reconnects': data['reconnects'], 'signals_at_s': offsets, 'duration_s': duration,
        'steady_rps': statistics.median(steady) if steady else None,
        'min_bucket_rps_after_signal': min(per_second[int(offsets[0] / data['bucket']):
                                                      int(duration / data['bucket']) - 1] or [0]),
    }
    walls = [wall for _, wall in sent]
    if signum == signal.SIGUSR2:
        result.update(_upgrade_times(text, masters, walls))
    else:
        result['completed_s'] = _reload_times(text, walls)
    return result


def _upgraded(old, pid, timeout=30):
    """The pid of the new master that USR2 to master `pid` started, once
    `pid` has exited (the upgrade is over: the next signal goes to the new one)."""
    regex = re.compile(NEW_MASTER.format(old=pid))
    found = wait_until(lambda: regex.search(old.log()), timeout, message=f'master {pid} to start a new master')
    new = int(found.group(1))
    try:
        wait_until(lambda: not _running(pid), timeout, interval=0.01, message=f'the old master {pid} to exit')
    except AssertionError:
        raise RuntimeError(f'the live upgrade of master {pid} did not complete:\n{old.log()[-3000:]}') from None
    old.alive()  # reaps the bench's own child once it has exited
    return new


def _stop_master(pid, timeout=15):
    """SIGTERM the master `pid` (not the bench's child: an upgrade started
    it), wait for it and its processes to exit, kill what is left."""
    try:
        family = [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
        os.kill(pid, signal.SIGTERM)
    except (psutil.NoSuchProcess, ProcessLookupError):
        return
    try:
        wait_until(lambda: not any(_running(p) for p in family), timeout, message=f'master {pid} to stop')
    except AssertionError:
        kill_pids(family)


def _reload_times(text, walls):
    """Seconds from each HUP (time.time()) until all 4 old workers retired, replacement ready."""
    retired = [_log_time(line) for line in text.splitlines()
               if 'retiring worker' in line and 'reloaded' in line]
    completions = []
    for wall in walls:
        after = sorted(t for t in retired if t is not None and t >= wall - 0.01)[:4]
        completions.append(round(after[-1] - wall, 3) if len(after) == 4 else None)
    return completions


def _upgrade_times(text, masters, walls):
    """From each USR2 (time.time()): the old master logged that the new one
    had taken over (its workers retire then), and it logged its exit
    (the upgrade complete); its exit status; the masters' pids in turn."""
    def logged(pattern):
        for line in text.splitlines():
            if (match := re.search(pattern, line)) and (stamp := _log_time(line)) is not None:
                return stamp, match
        return None, None
    taken, completed, statuses = [], [], []
    for old, wall in zip(masters, walls):
        stamp, _ = logged(rf'zkprefork\.master\[{old}\] upgrade: the new master \(pid \d+\) has taken over')
        taken.append(None if stamp is None else round(stamp - wall, 3))
        stamp, match = logged(rf'master \(pid {old}\) exiting with status (\d+)')
        completed.append(None if stamp is None else round(stamp - wall, 3))
        statuses.append(None if match is None else int(match.group(1)))
    return {'taken_over_s': taken, 'completed_s': completed, 'old_exit_status': statuses, 'masters': masters}


def _log_time(line):
    match = re.match(r'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})', line)
    if not match:
        return None
    stamp = datetime.datetime.strptime(match.group(1), '%Y-%m-%d %H:%M:%S')
    return stamp.timestamp() + int(match.group(2)) / 1000


# -- the scoreboard: balanced accepting, retiring without losses --------------

def slow_pairs(processes, workdir, trials):
    """zkprefork 2 workers × 1 thread; in each trial two concurrent 1 s
    requests on new connections, from an idle server: the number of
    workers each pair ran on."""
    server = Server('zkprefork', processes, workdir, threads=1).start()
    try:
        server.wait_ready()
        spread = []
        for _ in range(trials):
            time.sleep(0.3)  # the previous pair's connections closed: the server idles
            pids = [None, None]
            pair = [threading.Thread(target=_slow_request, args=(server.port, pids, i)) for i in range(2)]
            for thread in pair:
                thread.start()
            for thread in pair:
                thread.join(30)
            spread.append(len(set(pids)) if None not in pids else 0)
    finally:
        server.stop()
    return {'trials': trials, 'workers_per_pair': spread}


def _slow_request(port, pids, index):
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=20)
    try:
        connection.request('GET', '/sleep?ms=1000')
        response = connection.getresponse()
        response.read()
        pids[index] = response.getheader('X-Worker-Pid')
    except (OSError, http.client.HTTPException):
        pass  # a failed request: the trial counts 0 workers
    finally:
        connection.close()


# SIGHUP, SIGTTIN, SIGTTOU at these seconds after the idle clients started.
RETIRING_SIGNALS = ((1.5, signal.SIGHUP), (3.0, signal.SIGTTIN), (4.5, signal.SIGHUP),
                    (6.0, signal.SIGTTOU), (7.5, signal.SIGHUP), (9.0, signal.SIGHUP))


def retiring_under_idle_clients(processes, workdir, clients, duration):
    """zkprefork 2 × 4 with max_requests = 60 (jitter 30), `clients`
    keep-alive clients (plain http.client) idling 0.3-0.8 s between
    requests for `duration` s, the signals of RETIRING_SIGNALS sent: how
    many requests failed, and how often workers were replaced and why."""
    server = Server('zkprefork', processes, workdir,
                    ini_extra='max_requests = 60\nmax_requests_jitter = 30\n').start()
    try:
        server.wait_ready()
        started = time.monotonic()
        with IdleClients(server.port, clients, path='/sleep?ms=1') as load:
            for at, signum in RETIRING_SIGNALS:
                if at < duration - 2:
                    time.sleep(max(0.0, started + at - time.monotonic()))
                    server.proc.signal(signum)
            time.sleep(max(0.0, started + duration - time.monotonic()))
        text = server.proc.log()
    finally:
        server.stop()
    return {'clients': clients, 'duration_s': duration, 'ok': load.ok, 'failed': len(load.failures),
            'failures': [str(failure) for failure in load.failures[:20]],
            'signals': [signal.Signals(signum).name for at, signum in RETIRING_SIGNALS if at < duration - 2],
            'retired_reloaded': text.count('reloaded: its replacement is ready'),
            'retired_max_requests': text.count('asks to be replaced: served')}


# -- ZooKeeper: registration and deregistration latencies ---------------------

def zookeeper_latencies(processes, workdir, trials):
    from kazoo.client import KazooClient
    logging.getLogger('kazoo').setLevel(logging.ERROR)  # its reconnect chatter is not a result
    # ZooKeeper's own default tick (2 s): the 10 s session below is not capped.
    zk = ZooKeeperServer(tick_time=2000, directory=workdir)
    client = KazooClient(hosts=zk.hosts)
    results = {'start_registered_s': [], 'sigterm_gone_s': [], 'sigterm_logged_s': [], 'sigkill_gone_s': [],
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
            _zookeeper_trial(processes, workdir, zk, client, trial, how, results)
    finally:
        client.stop()
        client.close()
        zk.stop()
    return results


def _zookeeper_trial(processes, workdir, zk, client, trial, how, results):
    port = free_port()
    path = f'/bench/run-{os.getpid()}-{trial}/providers'
    node = f'{path}/127.0.0.1:{port}'
    client.ensure_path(path)
    created, deleted = _watch_event(), _watch_event()
    if client.exists(node, watch=created):
        raise RuntimeError(f'{node} exists before the start')
    server = Server('zkprefork', processes, workdir, port=port, workers=4, threads=4,
                    ini_extra=f'zookeeper = {zk.hosts}\npath = {path}\nsession_timeout = 10000\n')
    t0 = time.monotonic()
    server.start()
    try:
        if not created.event.wait(30):
            raise RuntimeError(f'zkprefork did not register:\n{server.proc.log()[-2000:]}')
        results['start_registered_s'].append(created.at - t0)
        results['workers_in_node'].append(json.loads(client.get(node)[0]).get('workers'))
        wait_until(lambda: len(server.worker_pids()) == 4, 10, message='4 workers')
        time.sleep(0.3)  # all four idle, as a server would be when it is stopped
        if not client.exists(node, watch=deleted):
            raise RuntimeError('the node went away by itself')
        workers = server.worker_pids()
        server.proc.children()  # remember every pid before the kill
        t0, sent = time.monotonic(), time.time()
        server.proc.signal(signal.SIGTERM if how == 'SIGTERM' else signal.SIGKILL)
        if not deleted.event.wait(30):
            raise RuntimeError(f'the node stayed after {how}')
        gone = deleted.at - t0
        if how == 'SIGTERM':
            results['sigterm_gone_s'].append(gone)
            server.proc.wait(30)
            results['sigterm_logged_s'].append(_logged_after(server.proc.log(), 'unregistered /', sent))
        else:
            results['sigkill_gone_s'].append(gone)
            results['workers_gone_after_sigkill_s'].append(_workers_gone_after(workers, t0))
        log(f'  ZooKeeper trial {trial + 1}: start->registered {results["start_registered_s"][-1] * 1000:.0f} ms, '
            f'{how}->node gone {gone * 1000:.1f} ms')
    finally:
        server.stop()


def _logged_after(text, needle, since):
    """Seconds from `since` (time.time()) to the first log line with
    `needle` (its millisecond time stamp), or None: what the server itself
    saw, beside what the watching client saw."""
    for line in text.splitlines():
        if needle in line and (stamp := _log_time(line)) is not None:
            return round(stamp - since, 4)
    return None


def _watch_event():
    """A kazoo watch that records when it first fired (.at, .event)."""
    def watch(event):
        if not watch.event.is_set():
            watch.at = time.monotonic()
            watch.event.set()
    watch.event = threading.Event()
    return watch


def _workers_gone_after(workers, since):
    """Seconds from since until every pid of workers has exited (None after 10 s)."""
    def gone():
        return not any(_running(pid) for pid in workers)
    try:
        wait_until(gone, 10, interval=0.005, message='orphaned workers to exit')
    except AssertionError:  # timed out
        return None
    return time.monotonic() - since


def _running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # kill -0 succeeds on a zombie
    except psutil.NoSuchProcess:
        return False
