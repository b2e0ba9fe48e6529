"""The report: bench/RESULTS.md (or RESULTS-quick.md), the reload plot, and
the peer table printed at the end of a run, all from the data of one run
(bench/results/main.json), so that `run.py --render` can write them again.

    machine_info   what the run was measured on (CPU, versions, commit)
    write_results  main.json (and apps.json, tls.json) -> RESULTS.md, the reload and upgrade plots
    peer_table     the side-by-side table with ratios to each peer (markdown lines)
    targets        the targets of main.json with their measured value and pass/fail
    suite_targets  the same for any run's data: main, apps (issue 22) or tls (issue 19)
"""
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess

from loads import LOADS
from measure import IDEAL_SLEEP10
from servers import KINDS

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
EXPERIMENTS = os.path.join(BENCH, 'experiments', 'NOTES.md')
REFERENCE = 'gunicorn-gthread'
BUSY_PCT = 5  # other CPU (median of a cell's rounds) above which the machine counts as shared
VERSIONS_OF = ('zkprefork', 'zope.server', 'gunicorn', 'waitress', 'pyuwsgi', 'granian', 'kazoo', 'psutil',
               'matplotlib', 'Flask', 'Jinja2', 'Django')
# The runs of `run.py --peers` besides main.json, each an interleaved run of its own.
SUITE_FILES = {'apps': 'apps.json', 'tls': 'tls.json'}


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
    for dist in VERSIONS_OF:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = 'not installed'
    wrk = subprocess.run(['wrk', '--version'], capture_output=True, text=True)
    versions['wrk'] = (wrk.stdout + wrk.stderr).split('[')[0].replace('wrk', '').strip()
    zk = subprocess.run(['dpkg-query', '-W', '-f', '${Version}', 'zookeeper'], capture_output=True, text=True)
    versions['zookeeper (Debian)'] = zk.stdout.strip() or 'not installed'
    commit, dirty = _commit()
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
        # The machine is shared: how loaded it was when the run began (1, 5, 15 min).
        'loadavg': [round(x, 2) for x in os.getloadavg()],
    }


def _commit():
    """(short commit, whether zkprefork/ differs from it)."""
    try:
        commit = subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'],
                                capture_output=True, text=True).stdout.strip()
        # What is measured is the working tree: say when it is not the commit.
        dirty = bool(subprocess.run(['git', '-C', REPO, 'status', '--porcelain', '--', 'zkprefork'],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        return '', False
    return commit, dirty


def _os_name():
    try:
        with open('/etc/os-release') as file:
            return re.search(r'PRETTY_NAME="([^"]+)"', file.read()).group(1)
    except (OSError, AttributeError):
        return platform.platform()


# -- writing RESULTS.md --------------------------------------------------------

def write_results(out_dir, quick):
    """Render out_dir's main.json, apps.json and tls.json (those there); (path of the RESULTS file, {name: data})."""
    runs = {'main': _load(os.path.join(out_dir, 'main.json'))}
    runs.update({name: _load(os.path.join(out_dir, file)) for name, file in SUITE_FILES.items()})
    main_data = runs['main']
    results_md = os.path.join(out_dir if quick else BENCH, 'RESULTS-quick.md' if quick else 'RESULTS.md')
    png_names = {}
    for part, (title, _, _, png) in SIGNALLED.items():  # the reload plot, the live upgrade plot
        png_names[part] = f'{png}-quick.png' if quick else f'{png}.png'
        if main_data and main_data.get(part, {}).get('per_bucket'):
            plot_reload(main_data[part], os.path.join(os.path.dirname(results_md), png_names[part]),
                        title=f'zkprefork, 4 workers x 4 threads, {title.lower()}')
    render(results_md, runs, png_names)
    return results_md, runs


def _load(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def render(path, runs, png_names):
    """png_names: {'reload': file name, 'upgrade': file name} of the plots, beside path."""
    lines = ['# zkprefork benchmark results', '']
    if runs.get('main'):
        lines += _render_main(runs['main'], png_names)
    for name in SUITE_FILES:
        if runs.get(name):
            lines += _render_suite(runs[name])
    # The record of the changes measured on the way (written by hand, not re-measured).
    with open(EXPERIMENTS) as file:
        lines += [file.read().strip(), '']
    with open(path, 'w') as file:
        file.write('\n'.join(lines) + '\n')


def _machine_lines(machine, settings, loadavg_end=None):
    v = machine['versions']
    optional = [(name, v.get(dist)) for name, dist in (('uWSGI (pyuwsgi)', 'pyuwsgi'), ('granian', 'granian'),
                                                      ('Flask', 'Flask'), ('Jinja2', 'Jinja2'), ('Django', 'Django'))]
    load = ''
    if machine.get('loadavg'):  # the machine is shared with other jobs: how busy it was
        load = f' Load average (1 / 5 / 15 min) when the run began: {" / ".join(map(str, machine["loadavg"]))}'
        load += f'; when it ended: {" / ".join(map(str, loadavg_end))}.' if loadavg_end else '.'
    return [
        f'Measured {machine["date"]} on {machine["nproc"]} CPU(s) `{machine["cpu"]}`, '
        f'{machine["memory_gib"]} GiB, {machine["os"]} (Linux {machine["kernel"]}), '
        f'Python {machine["python"]}; zkprefork {v["zkprefork"]} (commit {machine["commit"]}'
        f'{" + uncommitted changes to zkprefork/" if machine.get("dirty") else ""}), '
        f'zope.server {v["zope.server"]}, gunicorn {v["gunicorn"]}, waitress {v["waitress"]}, '
        + ''.join(f'{name} {version}, ' for name, version in optional if version not in (None, 'not installed'))
        + f'kazoo {v["kazoo"]}, wrk {v["wrk"]}, ZooKeeper {v["zookeeper (Debian)"]}.' + load,
        '',
        f'Command: `{settings["command"]}` — {settings["rounds"]} interleaved round(s) of '
        f'{settings["duration"]} s per cell (every round starts each server afresh, then for every load runs '
        'wrk against each server in turn: A, B, C, A, B, C …). '
        f'`wrk -t{settings.get("wrk_threads", 2)} -c N -d D --latency` on '
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


def _detail_table(summary, servers, loads, references=(REFERENCE,)):
    """One row per load and server: req/s, latency percentiles, the server's
    CPU per request, how the connections were served, errors, and the
    req/s as a multiple of each reference server's."""
    lines = ['| load | server | req/s (median) | min–max | p50 ms | p99 ms | p99.9 ms | server CPU µs/req '
             '| per connection | errors | ' + ' | '.join(f'× {ref}' for ref in references)
             + ' | other CPU % (median/max) |', '|---|---|' + '---:|' * (9 + len(references))]
    for load in loads:
        for server in servers:
            cell = summary.get(server, {}).get(load)
            if not cell:
                continue
            errors = str(cell['errors'])
            if cell['errors']:
                kinds = {**cell['socket_errors'], 'non2xx': cell['non2xx']}
                errors += ' (' + ', '.join(f'{k} {n}' for k, n in kinds.items() if n) + ')'
            name = f'**{server}**' if server.startswith('zkprefork') else server
            ratios = [_ratio(cell, summary.get(ref, {}).get(load)) for ref in references]
            lines.append(f'| {load} | {name} | {cell["rps"]:.0f} | {cell["rps_min"]:.0f}–{cell["rps_max"]:.0f} | '
                         f'{_fmt(cell["p50_ms"], 2)} | {_fmt(cell["p99_ms"], 2)} | {_fmt(cell.get("p999_ms"), 2)} | '
                         f'{_fmt(cell.get("server_cpu_us"), 0)} | {_fairness_cell(cell)} | {errors} | '
                         + ' | '.join(ratios) + f' | {_fmt(cell.get("other_cpu_pct"), 0)}/'
                         f'{_fmt(cell.get("other_cpu_max_pct"), 0)} |')
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
            for load, runs in cells.items() if LOADS[load].path == '/sleep10'
            for i, run in enumerate(runs) if run['rps'] < 0.95 * IDEAL_SLEEP10]
    if not slow:
        return []
    return ['', f'zkprefork rounds of the 10 ms app below 95% of {IDEAL_SLEEP10:.0f} req/s: {"; ".join(slow)}. '
            'Near 400 req/s (one worker\'s 4 threads / 10 ms) means that one worker took (nearly) all of '
            'wrk\'s connections when they opened, and the 10 ms app ran on its threads only: the workers '
            'accept from one socket, with no balancing between them (see Experiments, `bal`).']


def _add(rows, name, measured, ok):
    """A target row: (name, measured, True/False, or None when not measured)."""
    rows.append((name, measured, None if ok is None else bool(ok)))


def targets(main):
    s = main['summary']
    zk, ref = s.get('zkprefork', {}), s.get(REFERENCE, {})
    rows = []

    def ratio(load):
        if load in zk and load in ref and ref[load]['rps']:
            return zk[load]['rps'] / ref[load]['rps']
        return None
    r64, r16 = ratio('hello-ka64'), ratio('hello-ka16')
    _add(rows, 'hello 2×4, 64 keep-alive: ≥ 2.0× gunicorn gthread req/s', f'{_fmt(r64, 2)}×', r64 and r64 >= 2.0)
    _add(rows, 'hello 2×4, 16 keep-alive: ≥ 1.5× gunicorn gthread req/s', f'{_fmt(r16, 2)}×', r16 and r16 >= 1.5)
    for load in ('hello-ka16', 'hello-ka64'):
        if load in zk and load in ref:
            a, b = zk[load]['p99_ms'], ref[load]['p99_ms']
            _add(rows, f'{load}: p99 ≤ gunicorn gthread\'s', f'{_fmt(a, 2)} ms vs {_fmt(b, 2)} ms',
                a is not None and b is not None and a <= b)
    rows += _peer_targets(s)
    return rows + _run_targets(main)


def _run_targets(main):
    """The targets of the 10 ms app, the scoreboard, 1000 connections, reload, ZooKeeper and memory."""
    zk, rows = main['summary'].get('zkprefork', {}), []
    for load in ('sleep10-ka16', 'sleep10-ka64'):
        if load in zk:
            low = zk[load]['rps_min']
            _add(rows, f'10 ms app, {LOADS_CONNS[load]} keep-alive: every round ≥ 95% of {IDEAL_SLEEP10:.0f} req/s '
                '(the lowest round)', f'{low:.0f} req/s ({low / IDEAL_SLEEP10 * 100:.1f}%)',
                low >= 0.95 * IDEAL_SLEEP10)
    pairs = main.get('slow_pairs')
    if pairs:
        spread = pairs['workers_per_pair']
        _add(rows, '2 × 1 thread, two concurrent 1 s requests on new connections: on two workers in every trial',
            f'{spread.count(2)} of {len(spread)} trials', spread.count(2) == len(spread))
    idle = main.get('idle_clients')
    if idle:
        _add(rows, 'clients idling between requests on kept connections, across HUP, TTOU and max_requests: 0 failed',
            f'{idle["failed"]} failed of {idle["ok"] + idle["failed"]}', idle['failed'] == 0)
    if 'hello-ka1000' in zk:
        cell = zk['hello-ka1000']
        _add(rows, '1000 keep-alive connections on 2 workers all served (no errors, no timeouts)',
            f'{cell["errors"]} errors ({cell["socket_errors"]["timeout"]} timeouts) in {cell["rounds"]} round(s)',
            cell['errors'] == 0)
    rows += signalled_targets(main)
    return rows + _zookeeper_memory_targets(main)


def signalled_targets(main, parts=('reload', 'upgrade')):
    """The target rows of the rolling reload and the live upgrade (those of `parts` measured)."""
    rows = []
    for part in parts:
        if data := main.get(part):
            what = 'a HUP' if part == 'reload' else 'a live upgrade (USR2)'
            _add(rows, f'zero failed requests across {what} under load',
                f'{data["failed"]} failed of {data["ok"] + data["failed"]}', data['failed'] == 0)
    return rows


def _zookeeper_memory_targets(main):
    rows = []
    zkl = main.get('zookeeper')
    if zkl:
        def worst(key):
            values = [v for v in zkl[key] if v is not None]
            return max(values) if values else None
        w = worst('sigterm_gone_s')
        _add(rows, 'SIGTERM → node gone ≤ 50 ms (worst trial)', f'{_fmt(w and w * 1000, 1)} ms', w is not None and w <= 0.050)
        w = worst('sigkill_gone_s')
        _add(rows, 'master SIGKILL → node gone ≤ 1 s (worst trial)', f'{_fmt(w and w * 1000, 0)} ms', w is not None and w <= 1.0)
        w = worst('start_registered_s')
        _add(rows, 'start → registered with 4 workers ≤ 300 ms (worst trial)', f'{_fmt(w and w * 1000, 0)} ms',
            w is not None and w <= 0.300)
    mem = main.get('memory_preload', {}).get('preload = true')
    if mem:
        uss = max(w['uss'] for w in mem['workers']) / 1048576
        _add(rows, 'per-worker USS with preload ≤ 6 MB (largest worker)', f'{uss:.1f} MiB', uss <= 6.0)
    return rows


LOADS_CONNS = {'sleep10-ka16': 16, 'sleep10-ka64': 64}


def _peer_targets(summary, ours='zkprefork'):
    """Issue 14's targets against uWSGI and granian: (name, measured, ok) rows."""
    rows = []
    zk = summary.get(ours, {})
    for load, peer, least, what in (('hello-ka64', 'uwsgi', 1.0, 'hello 64 keep-alive'),
                                    ('hello-ka64', 'granian', 0.6, 'hello 64 keep-alive'),
                                    ('hello-ka16', 'uwsgi', 0.8, 'hello 16 keep-alive'),
                                    ('hello-close64', 'granian', 1.0, 'hello 64 `Connection: close`')):
        theirs = summary.get(peer, {}).get(load)
        if load in zk and theirs and theirs['rps']:
            ratio = zk[load]['rps'] / theirs['rps']
            rows.append((f'{what}: ≥ {least:.1f}× {peer} req/s', f'{ratio:.2f}×', ratio >= least))
    fairness = zk.get('hello-ka64', {}).get('fairness')
    if fairness:
        rows.append(('hello 64 keep-alive: every connection served (worst round)',
                     f'{fairness["conns_unserved"]} of {fairness["conns"]} got nothing; slowest got '
                     f'{fairness["conn_min"]}', fairness['conns_unserved'] == 0))
    theirs = summary.get('granian', {}).get('hello-ka64')
    if 'hello-ka64' in zk and theirs:
        a, b = zk['hello-ka64']['p99_ms'], theirs['p99_ms']
        rows.append(('hello 64 keep-alive: p99 ≤ granian\'s', f'{_fmt(a, 2)} ms vs {_fmt(b, 2)} ms',
                     a is not None and b is not None and a <= b))
    return rows


def _render_main(main, png_names):
    lines = ['## Side by side', ''] + _machine_lines(main['machine'], main['settings'], main.get('loadavg_end'))
    lines += ['Servers, 2 workers × 4 threads each: '
              + '; '.join(KINDS[server][0] for server in main['settings']['servers'])
              + '. Apps: bench/apps.py (hello world with Content-Length; `/sleep10` blocks 10 ms in '
              'time.sleep), the same callable for every server.', '']
    if any('fairness' in cell for loads in main['summary'].values() for cell in loads.values()):
        lines += ['### Side by side, with ratios to each peer', ''] + peer_table(main) + ['']
    lines += ['### Targets', '', '| target | measured | pass |', '|---|---|---|']
    for name, measured, ok in targets(main):
        lines.append(f'| {name} | {measured} | {"–" if ok is None else ("PASS" if ok else "**FAIL**")} |')
    lines += ['', '### Throughput and latency', '']
    lines += _detail_table(main['summary'], main['settings']['servers'], main['settings']['loads'])
    lines += _other_cpu_note(main['summary'])
    lines += _slow_rounds_note(main.get('cells', {}).get('zkprefork', {}))
    for part in SIGNALLED:  # the rolling reload, the live upgrade
        if main.get(part):
            lines += [''] + _render_reload(main[part], png_names[part], part)
    if main.get('slow_pairs'):
        lines += _render_scoreboard(main['slow_pairs'], main['idle_clients'])
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
                  f'| SIGTERM to the master → the registrar logged the node deleted (its own clock, ms resolution) | '
                  f'{ms(zkl.get("sigterm_logged_s", []))} |',
                  f'| SIGKILL to the master → node deleted | {ms(zkl["sigkill_gone_s"])} |',
                  f'| SIGKILL to the master → every orphaned worker exited | {ms(zkl["workers_gone_after_sigkill_s"])} |',
                  f'| `workers` in the node data | {", ".join(str(w) for w in zkl["workers_in_node"])} |', '']
    if main.get('memory_preload'):
        lines += _render_memory(main['memory_preload'], main.get('memory_after_load', {}))
    lines += [f'Total bench time: {main["elapsed_s"] / 60:.1f} min.', '']
    return lines


# The parts of main.json that signal the master under load (measure.reload_under_load):
# part -> (section title, what the signal does, when it is complete, plot's base name).
SIGNALLED = {
    'reload': ('Rolling reload under load', 'a rolling reload',
               'all 4 old workers retired (replacement ready) within', 'reload'),
    'upgrade': ('Live upgrade under load', 'a live upgrade: a new master re-execs with the same command line, '
                'inherits the socket, boots 4 workers; the old master\'s workers retire and it exits',
                'the old master exited (status {status}) within', 'upgrade'),
}


def _signalled(data):
    """A reload_under_load result; the names of an older main.json (SIGHUP only) read as today's."""
    old = {'signals_at_s': 'hups_at_s', 'completed_s': 'reload_completed_s',
           'min_bucket_rps_after_signal': 'min_bucket_rps_after_hup'}
    return {'signal': 'SIGHUP', **{new: data[name] for new, name in old.items() if name in data}, **data}


def _render_reload(data, png_name, part='reload'):
    """The section of a rolling reload (SIGHUP) or live upgrade (SIGUSR2) under load."""
    data = _signalled(data)
    title, what, completed, _ = SIGNALLED[part]
    sig = data['signal'][3:]
    lines = [f'### {title}', '']
    if data.get('measured'):  # measured alone (run.py --only-upgrade), not with the rest of this section
        stamp = data['measured']
        lines += [f'Measured {stamp["date"]} by `{stamp["command"]}` (commit {stamp["commit"]}'
                  f'{" + uncommitted changes to zkprefork/" if stamp.get("dirty") else ""}), not with the rest '
                  'of this section: its req/s compare with the others\' only loosely. Load average (1 / 5 / 15 min) '
                  f'{" / ".join(map(str, stamp["loadavg"]))} when it began'
                  + (f', {" / ".join(map(str, stamp["loadavg_end"]))} when it ended.' if stamp.get('loadavg_end')
                     else '.'), '']
    lines += ['zkprefork 4 workers × 4 threads, hello world, bench/loadgen.py with 48 keep-alive connections '
              f'for {data["duration_s"]} s, {data["signal"]} to the master ({what}) at '
              f'{", ".join(f"{t:.1f}" for t in data["signals_at_s"])} s'
              + (' (each to the master serving then). No `zookeeper` option, as for the reload: the '
                 'ZooKeeper session hand-over is not part of these times.' if part == 'upgrade' else '.'),
              '',
              f'- responses: {data["ok"]} ok, **{data["failed"]} failed**; '
              f'{data["reconnects"]} reconnects after `Connection: close` from draining workers',
              f'- steady state before the {sig}: {_fmt(data["steady_rps"], 0)} req/s (median of 100 ms buckets); '
              f'lowest 100 ms bucket after it: {_fmt(data["min_bucket_rps_after_signal"], 0)} req/s']
    if part == 'upgrade':
        statuses = ', '.join('–' if s is None else str(s) for s in data['old_exit_status'])
        lines += ['- the new master had taken over (the old master\'s log says so; its workers retire then) '
                  'within: ' + ', '.join(f'{_fmt(t, 2)} s' for t in data['taken_over_s']) + f' of the {sig}',
                  f'- {completed.format(status=statuses)}: '
                  + ', '.join(f'{_fmt(c, 2)} s' for c in data['completed_s']) + f' of the {sig} (masters, pid: '
                  + ' → '.join(map(str, data['masters'])) + ')']
    else:
        lines += [f'- {completed}: ' + ', '.join(f'{_fmt(c, 2)} s' for c in data['completed_s'])
                  + f' of the {sig}']
    if part == 'upgrade' or data.get('measured'):
        lines += ['- the machine is shared with other jobs (see the load average): the req/s figures are noisy; '
                  'the failed responses are what this measures']
    lines += ['', f'![requests per second across the {sig}]({png_name})', '']
    if data['failures']:
        lines += ['First failures (monotonic time, error):', '', '```']
        lines += [f'{t:.3f} {e}' for t, e in data['failures']]
        lines += ['```', '']
    return lines


def _render_scoreboard(pairs, idle):
    return ['### Balanced accepting and retiring workers (the scoreboard)', '',
            f'- zkprefork 2 workers × 1 thread, two concurrent 1 s requests on new connections, {pairs["trials"]} '
            'trials from an idle server: workers each pair ran on: '
            + ', '.join(map(str, pairs['workers_per_pair'])) + ' (0: a request failed)',
            f'- zkprefork 2 × 4, max_requests = 60 (jitter 30), {idle["clients"]} keep-alive clients (plain '
            'http.client, which never probes a kept connection) idling 0.3–0.8 s between requests for '
            f'{idle["duration_s"]} s, signals {", ".join(idle["signals"])}: **{idle["failed"]} failed** of '
            f'{idle["ok"] + idle["failed"]}; workers retired on reload {idle["retired_reloaded"]}, '
            f'at max_requests {idle["retired_max_requests"]}', '']


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


def plot_reload(data, png_path, title='zkprefork, 4 workers x 4 threads, rolling reload under load', label=None):
    """Responses per second (100 ms buckets) across the signals (a HUP, a
    USR2...: label, default 'SIGHUP to the master'), failures as grey lines."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    data = _signalled(data)
    label = label or f'{data["signal"]} to the master'
    bucket = data['bucket']
    counts = data['per_bucket'][:-1]  # the last bucket is cut short by the end of the load
    xs = [i * bucket for i in range(len(counts))]
    ys = [c / bucket for c in counts]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(xs, ys, drawstyle='steps-post', linewidth=1.2, label='responses/s (100 ms buckets)')
    for i, at in enumerate(data['signals_at_s']):
        ax.axvline(at, color='red', linestyle='--', label=label if i == 0 else None)
    for when in data['failure_offsets_s']:
        ax.axvline(when, color='black', alpha=0.3, linewidth=0.8)
    ax.set_xlabel('seconds since the load started')
    ax.set_ylabel('requests/s')
    ax.set_ylim(bottom=0)
    ax.set_title(f'{title}: {data["ok"]} ok, {data["failed"]} failed')
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# -- the side-by-side table ------------------------------------------------------

def peer_table(main, ours='zkprefork'):
    """Markdown lines: req/s (p99) per load and server, the fairness of each
    cell, and zkprefork's req/s as a multiple of each peer's."""
    summary, settings = main['summary'], main['settings']
    servers = [server for server in settings['servers'] if server in summary]
    loads = [load for load in settings['loads'] if any(load in summary[server] for server in servers)]
    peers = [server for server in servers if server != ours]

    def row(label, cells):
        return f'| {label} | ' + ' | '.join(cells) + ' |'

    def each(load, text):
        return [text(summary[server][load]) if load in summary[server] else '–' for server in servers]
    header = [row('load', servers), '|---|' + '---:|' * len(servers)]
    lines = ['Median req/s over the rounds (median p99 in ms):', ''] + header
    lines += [row(load, each(load, lambda cell: f'{cell["rps"]:.0f} ({_fmt(cell["p99_ms"])})'))
              for load in loads]
    lines += ['', f'Per connection (bench/loadgen.py, {settings.get("fairness_duration")} s after each wrk cell, '
              'the worst round): responses completed by the slowest connection / connections that got none / '
              'Jain\'s fairness index of the responses per connection (1: all alike; 1/N: one got all):',
              ''] + header
    lines += [row(load, each(load, _fairness_cell)) for load in loads]
    if ours in servers and peers:
        lines += ['', f'{ours} req/s ÷ each peer\'s:', '', row('load', peers), '|---|' + '---:|' * len(peers)]
        lines += [row(load, [_ratio(summary[ours].get(load), summary[peer].get(load)) for peer in peers])
                  for load in loads]
    return lines


def _fairness_cell(cell):
    fairness = cell.get('fairness')
    if not fairness:
        return '–'
    jain = f' / {fairness["jain"]:.2f}' if 'jain' in fairness else ''
    return f'{fairness["conn_min"]} / {fairness["conns_unserved"]} of {fairness["conns"]}{jain}'


def _ratio(ours, theirs):
    if not ours or not theirs or not theirs['rps']:
        return '–'
    return f'{ours["rps"] / theirs["rps"]:.2f}×'


# -- the real applications (issue 22) and TLS (issue 19) ------------------------

SUITE_TITLES = {
    'apps': ('Real applications, side by side',
             'Apps: bench/realapps.py — the Flask page (a Jinja template of 50 rows, compiled once), the Flask JSON '
             'API (100 objects) and a Django template view (the same 50 rows, cached loader), one callable for '
             'every server. Targets (issue 22): req/s ≥ 1.0× granian and ≥ 1.0× uWSGI with every connection '
             'served, p99 ≤ 1.1× granian\'s.'),
    'tls': ('TLS, side by side',
            'The servers that terminate TLS themselves, with the same certificate (ECDSA P-256 from a trustme test '
            'CA, made for the run; all negotiate TLS 1.3 with wrk): zkprefork (`certfile`/`keyfile` in its ini), '
            'gunicorn gthread (`--certfile/--keyfile`), granian (`--ssl-certificate/--ssl-keyfile`); waitress has '
            'no TLS and the pyuwsgi wheel is built without OpenSSL. Apps: hello world and the Flask page of '
            'bench/realapps.py. In the `close64` loads every request is a new connection with a **full '
            'handshake** (wrk would otherwise resume its last session: bench/fullhandshake.c), so req/s there is '
            'handshakes/s. Targets (issue 19): on the Flask page ≥ 2× gunicorn and ≥ 0.9× granian, handshakes/s '
            '≥ gunicorn\'s, no connection left unserved.'),
}
SUITE_REFERENCES = {'apps': ('granian', 'uwsgi'), 'tls': ('granian', 'gunicorn-gthread')}


def _render_suite(data):
    """The section of RESULTS.md for an apps.json or tls.json run."""
    title, what = SUITE_TITLES[data['name']]
    settings, summary = data['settings'], data['summary']
    servers = [server for server in settings['servers'] if server in summary]
    lines = [f'## {title}', ''] + _machine_lines(data['machine'], settings, data.get('loadavg_end'))
    lines += [f'Servers, 2 workers × 4 threads each: {"; ".join(KINDS[server][0] for server in servers)}. {what}',
              '', '"Server CPU" is the user + system CPU time of all the server\'s processes (master, workers, '
              'helpers; psutil) during the wrk cell, divided by the requests wrk completed. "Per connection": '
              f'bench/loadgen.py, {settings.get("fairness_duration")} s after each wrk cell, the worst round: '
              'responses completed by the slowest connection / connections that got none / Jain\'s index.', '',
              '### Targets', ''] + _target_matrix(_suite_checks(data)) + ['', '### Figures', '']
    lines += _detail_table(summary, servers, settings['loads'], SUITE_REFERENCES[data['name']])
    if data.get('note'):  # written by hand into the json: what the figures cannot say by themselves
        lines += ['', f'**Note:** {data["note"]}']
    lines += _other_cpu_note(summary) + ['', f'Bench time: {data["elapsed_s"] / 60:.1f} min.', '']
    return lines


def suite_targets(data):
    """(name, measured, ok) rows of any run: main.json's targets, or those of apps/tls."""
    if data.get('name', 'main') == 'main':
        return targets(data)
    return [(f'{load}: {check}', measured, ok) for load, check, measured, ok in _suite_checks(data)]


def _suite_checks(data):
    """(load, check, measured, ok) of the apps or tls targets, for zkprefork."""
    summary, checks = data['summary'], []
    zk = summary.get('zkprefork', {})
    for load in data['settings']['loads']:
        if load not in zk:
            continue
        ours = zk[load]
        for what, peer, least in _RATIO_TARGETS[data['name']](load):
            theirs = summary.get(peer, {}).get(load)
            if theirs and theirs['rps']:
                ratio = ours['rps'] / theirs['rps']
                checks.append((load, f'{what} ≥ {least:.1f}× {peer}', f'{ratio:.2f}×', ratio >= least))
        if data['name'] == 'apps' and summary.get('granian', {}).get(load):
            a, b = ours['p99_ms'], summary['granian'][load]['p99_ms']
            checks.append((load, 'p99 ≤ 1.1× granian\'s', f'{_fmt(a, 1)} vs {_fmt(b, 1)} ms',
                           a is not None and b is not None and a <= 1.1 * b))
        fairness = ours.get('fairness') or {}
        checks.append((load, 'every connection served (wrk errors; loadgen: connections unserved)',
                       f'{ours["errors"]} errors; {fairness.get("conns_unserved", "–")} of '
                       f'{fairness.get("conns", "–")} unserved',
                       ours['errors'] == 0 and fairness.get('conns_unserved') == 0))
    return checks


def _tls_ratio_targets(load):
    """(what, peer, least) of issue 19: the ratios on the real application;
    handshakes/s (req/s on new connections, a full handshake each) ≥ gunicorn's."""
    ratios = [('req/s', 'gunicorn-gthread', 2.0), ('req/s', 'granian', 0.9)] if load.startswith('tls-page') else []
    return ratios + ([('handshakes/s', 'gunicorn-gthread', 1.0)] if 'close' in load else [])


_RATIO_TARGETS = {'apps': lambda load: [('req/s', 'granian', 1.0), ('req/s', 'uwsgi', 1.0)],
                  'tls': _tls_ratio_targets}


def _target_matrix(checks):
    """Markdown lines: a row per load, a column per check, 'measured PASS/FAIL' in each cell."""
    order = ('req/s', 'handshakes/s', 'p99', 'every')  # the columns: ratios, then latency, then fairness
    names = sorted(dict.fromkeys(check for _, check, _, _ in checks),
                   key=lambda name: [name.startswith(prefix) for prefix in order].index(True))
    loads = list(dict.fromkeys(load for load, _, _, _ in checks))
    found = {(load, check): (measured, ok) for load, check, measured, ok in checks}
    lines = ['| load | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
    for load in loads:
        cells = [f'{found[load, name][0]} {"PASS" if found[load, name][1] else "**FAIL**"}'
                 if (load, name) in found else '–' for name in names]
        lines.append(f'| {load} | ' + ' | '.join(cells) + ' |')
    passed = sum(1 for *_, ok in checks if ok)
    return lines + ['', f'{passed} of {len(checks)} targets pass.']
