#!/usr/bin/env python3
"""zkprefork benchmark: side by side with gunicorn, waitress, uWSGI and granian, on this machine.

    pip install -e '.[bench]' && apt-get install -y wrk zookeeper   # once
    python3 bench/run.py                 # the full run
    python3 bench/run.py --quick         # a smoke run of a few seconds per cell
    python3 bench/run.py --peers         # the peer tables: hello world (issue 14), real
                                         # applications (issue 22), TLS (issue 19), with ratios
    python3 bench/run.py --peers --only apps   # one of them (hello, apps, tls; comma separated)
    python3 bench/run.py --only-upgrade  # only the live upgrade under load (into main.json, the rest kept)

See bench/README.md.  Results go to bench/RESULTS.md (and bench/reload.png, upgrade.png);
raw numbers to bench/results/main.json (apps.json, tls.json for those peer
tables: each is an interleaved run of its own, replaced only by its own).  A --quick run writes to
bench/results/tmp/ instead, so it never replaces the committed results.

This file only reads the command line and runs the parts in order:
bench/servers.py starts the servers, bench/loads.py the clients,
bench/measure.py measures, bench/report.py writes the results.  Everything
started is stopped by pid (and by its own process group) in a finally, on
every path.  All traffic goes to 127.0.0.1.
"""
import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RESULTS_DIR = os.path.join(BENCH, 'results')
sys.path[:0] = [BENCH, REPO]  # bench's modules, and this checkout's zkprefork (as the servers get)

import measure  # noqa: E402
import report  # noqa: E402
from loads import LOADS  # noqa: E402
from servers import KINDS, SCRIPTS, TLS_KINDS  # noqa: E402
from zkprefork.testing import Processes  # noqa: E402

PARTS = ('throughput', 'reload', 'upgrade', 'scoreboard', 'zookeeper', 'memory')
PEER_SERVERS = ['zkprefork', 'gunicorn-gthread', 'uwsgi', 'granian', 'waitress']
NO_PARTS = {'reload', 'upgrade', 'scoreboard', 'zookeeper', 'memory'}
# --peers: the side-by-side tables, each an interleaved run of its own (its
# ratios are what count) written to its own file in bench/results/. wrk -t1:
# on 2 cores one wrk thread leaves the servers the other core.
SUITES = {
    # issue 14's table
    'hello': {'file': 'main.json', 'servers': PEER_SERVERS,
              'loads': ['hello-ka16', 'hello-ka64', 'hello-ka256', 'hello-close64', 'sleep10-ka16'],
              'wrk_threads': 1, 'rounds': 3, 'duration': 3, 'fairness': 3},
    # issue 22: Flask page and API, Django view; ~15 min with these defaults
    'apps': {'file': 'apps.json', 'servers': PEER_SERVERS,
             'loads': [load for load in LOADS if LOADS[load].app == 'realapps' and not LOADS[load].tls],
             'wrk_threads': 1, 'rounds': 3, 'duration': 3, 'fairness': 2},
    # issue 19 item 7: the servers with TLS of their own; ~5 min
    'tls': {'file': 'tls.json', 'servers': ['zkprefork', 'gunicorn-gthread', 'granian'],
            'loads': [load for load in LOADS if LOADS[load].tls],
            'wrk_threads': 1, 'rounds': 3, 'duration': 3, 'fairness': 2},
}
# The full run (no --peers): every part, the hello-world and 10 ms loads.
FULL = {'file': 'main.json', 'servers': list(KINDS), 'wrk_threads': 2, 'rounds': 3, 'duration': 5, 'fairness': 3,
        'loads': [load for load in LOADS if LOADS[load].app == 'apps' and not LOADS[load].tls]}
# What each server kind needs from the bench extra (module, or console script).
NEEDS = {'gunicorn-gthread': 'gunicorn', 'gunicorn-sync': 'gunicorn', 'waitress': 'waitress',
         'uwsgi': 'script:uwsgi', 'granian': 'granian'}


def suite_of(load):
    """Which peer table a load belongs to."""
    return 'tls' if LOADS[load].tls else 'apps' if LOADS[load].app == 'realapps' else 'hello'


def missing_tools(runs):
    """What these runs need and do not find, as install commands."""
    servers = {server for run in runs for server in run.servers}
    parts = {part for run in runs for part in run.parts}
    loads = [LOADS[load] for run in runs for load in run.loads]
    needed = {NEEDS[server] for server in servers if server in NEEDS}
    if parts & {'reload', 'upgrade'}:
        needed.add('matplotlib')
    if any(load.app == 'realapps' for load in loads):
        needed.update({'flask', 'django'})
    if any(load.tls for load in loads):
        needed.add('trustme')
    pip = sorted(need for need in needed
                 if not (os.path.exists(os.path.join(SCRIPTS, need[7:])) if need.startswith('script:')
                         else importlib.util.find_spec(need)))
    apt = [tool for tool, needs in (('wrk', True), ('gcc', any(load.tls for load in loads)))
           if needs and not shutil.which(tool)]  # gcc: bench/fullhandshake.c
    if 'zookeeper' in parts and not os.path.exists('/usr/share/java/zookeeper.jar'):
        apt.append('zookeeper')
    commands = []
    if pip:
        commands.append(f"pip install -e '.[bench]'   (missing: {', '.join(p.replace('script:', '') for p in pip)})")
    if apt:
        commands.append(f'apt-get update && apt-get install -y {" ".join(apt)}')
    return commands


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--quick', action='store_true', help='a smoke run: 1 round, 2 s per cell')
    parser.add_argument('--peers', action='store_true',
                        help='only the peer tables (' + '; '.join(f'{name}: {", ".join(suite["loads"])}'
                                                                  for name, suite in SUITES.items()) + ')')
    parser.add_argument('--only', help=f'with --peers: comma separated tables among {", ".join(SUITES)}')
    parser.add_argument('--rounds', type=int, help='interleaved rounds (default 3, --quick 1)')
    parser.add_argument('--duration', type=int, help='seconds of wrk per cell (default 5, --peers 3, --quick 2)')
    parser.add_argument('--wrk-threads', type=int, help='wrk -t (default 2, --peers 1)')
    parser.add_argument('--fairness', type=float,
                        help='seconds of bench/loadgen.py per cell, after wrk, for the per-connection counts '
                             '(default 3, --peers apps/tls 2, --quick 2; 0: none)')
    parser.add_argument('--servers', help=f'comma separated servers (default: all of {", ".join(KINDS)})')
    parser.add_argument('--loads', help=f'comma separated loads (default: all of {", ".join(LOADS)})')
    parser.add_argument('--render', action='store_true',
                        help='only write RESULTS.md again from bench/results/*.json (no measurement)')
    parser.add_argument('--keep', action='store_true', help='keep the logs of every process (bench/results/tmp/)')
    parser.add_argument('--skip', default='', help=f'comma separated parts to skip: {",".join(PARTS)}')
    parser.add_argument('--only-upgrade', action='store_true',
                        help='only the live upgrade under load (~15 s): replaces the "upgrade" of main.json '
                             '(bench/results/tmp/ with --quick), keeps the rest of it')
    args = parser.parse_args()
    if args.only_upgrade and (args.peers or args.skip or args.servers or args.loads or args.render):
        parser.error('--only-upgrade runs that part alone: no --peers, --skip, --servers, --loads or --render')
    for name, chosen, known in (('server', args.servers, KINDS), ('load', args.loads, LOADS),
                                ('table', args.only, SUITES)):
        if unknown := [item for item in (chosen or '').split(',') if item and item not in known]:
            parser.error(f'unknown {name}(s) {", ".join(unknown)}: choose from {", ".join(known)}')
    if args.only and not args.peers:
        parser.error('--only chooses among the peer tables: give --peers too')
    args.runs = [run for run in planned_runs(args) if (run.loads or run.merge) and run.servers]
    if not args.runs:
        parser.error('nothing to run: no load of those tables, or no server that serves them')
    return args


def planned_runs(args):
    """The interleaved runs to make, each a namespace of its settings:
    --peers: one per table of SUITES (those of --only); else the full run."""
    if args.only_upgrade:  # one part, merged into main.json (see merged)
        return [argparse.Namespace(name='main', file=FULL['file'], loads=[], servers=['zkprefork'], quick=args.quick,
                                   rounds=0, duration=0, wrk_threads=None, fairness=0, parts=['upgrade'],
                                   merge=True)]
    chosen = (args.only.split(',') if args.only else list(SUITES)) if args.peers else ['main']
    given = args.loads.split(',') if args.loads else None
    runs = []
    for name in chosen:
        preset = SUITES.get(name, FULL)
        loads = [load for load in given if name == 'main' or suite_of(load) == name] if given else preset['loads']
        servers = args.servers.split(',') if args.servers else preset['servers']
        skipped = set(filter(None, args.skip.split(','))) | (NO_PARTS if args.peers else set())
        runs.append(argparse.Namespace(
            name='main' if name == 'hello' else name, file=preset['file'], loads=loads, quick=args.quick,
            servers=[server for server in servers if name != 'tls' or server in TLS_KINDS],
            rounds=args.rounds or (1 if args.quick else preset['rounds']),
            duration=args.duration or (2 if args.quick else preset['duration']),
            wrk_threads=args.wrk_threads or preset['wrk_threads'],
            fairness=args.fairness if args.fairness is not None else 2 if args.quick else preset['fairness'],
            parts=[part for part in PARTS if part not in skipped], merge=False))
    return runs


def measure_all(args, processes, workdir):
    """Every part of one run (of planned_runs) that is not skipped; the data of its json file."""
    result = {'summary': {}}
    if 'throughput' in args.parts:
        cells, memory = measure.throughput(processes, workdir, args.servers, args.loads, args.rounds,
                                           args.duration, args.wrk_threads, args.fairness)
        result.update(cells=cells, summary=measure.summarize(cells), memory_after_load=memory)
    for part, signum, what in (('reload', signal.SIGHUP, 'rolling reload (HUP)'),
                               ('upgrade', signal.SIGUSR2, 'live upgrade (USR2)')):
        if part in args.parts:
            measure.log(f'{what} under load')
            result[part] = measure.reload_under_load(processes, workdir, 6 if args.quick else 12,
                                                     [2.5] if args.quick else [3.0, 7.5], signum)
            measure.log(f'  {part}: {result[part]["ok"]} ok, {result[part]["failed"]} failed, complete '
                        f'{result[part]["completed_s"]} s after the {signum.name}')
    if 'scoreboard' in args.parts:
        measure.log('two concurrent 1 s requests on 2 workers × 1 thread')
        result['slow_pairs'] = measure.slow_pairs(processes, workdir, 10)
        measure.log(f'  workers per pair: {result["slow_pairs"]["workers_per_pair"]}')
        measure.log('HUP, TTIN/TTOU and max_requests under clients idling between requests')
        result['idle_clients'] = measure.retiring_under_idle_clients(processes, workdir, 40, 6 if args.quick else 12)
        measure.log(f'  idle clients: {result["idle_clients"]["ok"]} ok, {result["idle_clients"]["failed"]} failed')
    if 'zookeeper' in args.parts:
        measure.log('ZooKeeper latencies')
        result['zookeeper'] = measure.zookeeper_latencies(processes, workdir, 1 if args.quick else 3)
    if 'memory' in args.parts:
        measure.log('memory per worker, with and without preload')
        result['memory_preload'] = measure.memory_preload(processes, workdir, 1 if args.quick else 2)
    return result


def main():
    args = parse_args()
    out_dir = os.path.join(RESULTS_DIR, 'tmp') if args.quick else RESULTS_DIR
    os.makedirs(os.path.join(RESULTS_DIR, 'tmp'), exist_ok=True)
    if args.render:
        report.write_results(out_dir, args.quick)
        return 0
    if missing := missing_tools(args.runs):
        print('bench: this run needs, from the repository root:\n    ' + '\n    '.join(missing), file=sys.stderr)
        return 2

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    # Explicitly: a shell's background job starts with SIGINT ignored, and
    # SIGTERM would end the bench without its finally (and leave servers running).
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    workdir = tempfile.mkdtemp(prefix='zkprefork-bench-', dir=os.path.join(RESULTS_DIR, 'tmp'))
    command = 'python3 bench/run.py' + ' '.join([''] + sys.argv[1:])
    measure.log(f'bench: {command}; logs in {workdir}')
    for run in args.runs:  # each written as soon as it is done: an interrupted run keeps the others
        path = os.path.join(out_dir, run.file)
        result = run_one(run, command, workdir)
        measure.log(f'{"+".join(run.parts) if run.merge else run.name} done in {result["elapsed_s"] / 60:.1f} min')
        if run.merge:
            result = merged(path, result, run.parts)
        with open(path, 'w') as file:
            json.dump(result, file, indent=1)
    results_md, runs = report.write_results(out_dir, args.quick)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    measure.log(f'written: {results_md}')
    for run in args.runs:
        print_summary(runs[run.name], run.parts if run.merge else None)
    return 0


def merged(path, result, parts):
    """The run's json file (path) with `parts` replaced by those of `result`,
    each stamped with when and how it was measured; the rest kept as it was."""
    try:
        with open(path) as file:
            data = json.load(file)
    except (OSError, ValueError):  # none yet: this run alone
        data = result
    machine = result['machine']
    for part in parts:
        data[part] = dict(result[part], measured={
            'date': machine['date'], 'command': result['settings']['command'], 'commit': machine['commit'],
            'dirty': machine['dirty'], 'loadavg': machine['loadavg'], 'loadavg_end': result['loadavg_end'],
            'elapsed_s': round(result['elapsed_s'], 1)})
    return data


def run_one(run, command, workdir):
    """One interleaved run of planned_runs, every process it started stopped on every path."""
    processes = Processes()
    began = time.monotonic()
    settings = {'rounds': run.rounds, 'duration': run.duration, 'servers': run.servers, 'loads': run.loads,
                'wrk_threads': run.wrk_threads, 'fairness_duration': run.fairness, 'command': command,
                'quick': run.quick}
    try:
        result = {'machine': report.machine_info(), 'name': run.name, 'settings': settings,
                  **measure_all(run, processes, workdir)}
    finally:
        processes.stop_all()
    result['elapsed_s'] = time.monotonic() - began
    result['loadavg_end'] = [round(x, 2) for x in os.getloadavg()]
    return result


def print_summary(data, parts=None):
    """The peer table and the targets of a run's data; with parts (a run of
    those alone, merged into it), only the targets of those parts."""
    if parts:
        for part in parts:
            print(f'\n== {part}: {data[part]["measured"]["command"]}\n')
        for name, measured, ok in report.signalled_targets(data, parts):
            print(f'{"PASS" if ok else "FAIL"}  {name}: {measured}')
        return
    print(f'\n== {data["name"]}: {data["settings"]["command"]}')
    if data['summary']:
        print('\n' + '\n'.join(report.peer_table(data)))
    print()
    for name, measured, ok in report.suite_targets(data):
        print(f'{"PASS" if ok else "FAIL" if ok is not None else "    "}  {name}: {measured}')


if __name__ == '__main__':
    sys.exit(main())
