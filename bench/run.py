#!/usr/bin/env python3
"""zkprefork benchmark: side by side with gunicorn, waitress, uWSGI and granian, on this machine.

    pip install -e '.[bench]' && apt-get install -y wrk zookeeper   # once
    python3 bench/run.py                 # the full run
    python3 bench/run.py --quick         # a smoke run of a few seconds per cell
    python3 bench/run.py --peers         # only the peer table of issue 14, with ratios

See bench/README.md.  Results go to bench/RESULTS.md (and bench/reload.png);
raw numbers to bench/results/main.json.  A --quick run writes to
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
from servers import KINDS, SCRIPTS  # noqa: E402
from zkprefork.testing import Processes  # noqa: E402

PARTS = ('throughput', 'reload', 'scoreboard', 'zookeeper', 'memory')
# The table of issue 14: these servers and loads, wrk -t1, 3 rounds of 3 s.
PEERS = {'servers': ['zkprefork', 'gunicorn-gthread', 'uwsgi', 'granian', 'waitress'],
         'loads': ['hello-ka16', 'hello-ka64', 'hello-ka256', 'hello-close64', 'sleep10-ka16'],
         'wrk_threads': 1, 'rounds': 3, 'duration': 3, 'skip': {'reload', 'scoreboard', 'zookeeper', 'memory'}}
# What each server kind needs from the bench extra (module, or console script).
NEEDS = {'gunicorn-gthread': 'gunicorn', 'gunicorn-sync': 'gunicorn', 'waitress': 'waitress',
         'uwsgi': 'script:uwsgi', 'granian': 'granian'}


def missing_tools(servers, parts):
    """What this run needs and does not find, as install commands."""
    needed = {NEEDS[server] for server in servers if server in NEEDS}
    if 'reload' in parts:
        needed.add('matplotlib')
    pip = sorted(need for need in needed
                 if not (os.path.exists(os.path.join(SCRIPTS, need[7:])) if need.startswith('script:')
                         else importlib.util.find_spec(need)))
    apt = [] if shutil.which('wrk') else ['wrk']
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
                        help=f'only the peer table: {", ".join(PEERS["servers"])} × {", ".join(PEERS["loads"])}, '
                             'wrk -t1, 3 rounds of 3 s (with --quick: 1 round of 2 s)')
    parser.add_argument('--rounds', type=int, help='interleaved rounds (default 3, --quick 1)')
    parser.add_argument('--duration', type=int, help='seconds of wrk per cell (default 5, --quick 2)')
    parser.add_argument('--wrk-threads', type=int, help='wrk -t (default 2, --peers 1)')
    parser.add_argument('--fairness', type=float,
                        help='seconds of bench/loadgen.py per cell, after wrk, for the per-connection counts '
                             '(default 3, --quick 2; 0: none)')
    parser.add_argument('--servers', help=f'comma separated servers (default: all of {", ".join(KINDS)})')
    parser.add_argument('--loads', help=f'comma separated loads (default: all of {", ".join(LOADS)})')
    parser.add_argument('--render', action='store_true',
                        help='only write RESULTS.md again from bench/results/main.json (no measurement)')
    parser.add_argument('--keep', action='store_true', help='keep the logs of every process (bench/results/tmp/)')
    parser.add_argument('--skip', default='', help=f'comma separated parts to skip: {",".join(PARTS)}')
    args = parser.parse_args()
    preset = PEERS if args.peers else {}
    args.rounds = args.rounds or (1 if args.quick else preset.get('rounds', 3))
    args.duration = args.duration or (2 if args.quick else preset.get('duration', 5))
    args.wrk_threads = args.wrk_threads or preset.get('wrk_threads', 2)
    args.fairness = (2 if args.quick else 3) if args.fairness is None else args.fairness
    args.servers = args.servers.split(',') if args.servers else preset.get('servers', list(KINDS))
    args.loads = args.loads.split(',') if args.loads else preset.get('loads', list(LOADS))
    args.parts = [part for part in PARTS
                  if part not in set(filter(None, args.skip.split(','))) | preset.get('skip', set())]
    for name, chosen, known in (('server', args.servers, KINDS), ('load', args.loads, LOADS)):
        if unknown := [item for item in chosen if item not in known]:
            parser.error(f'unknown {name}(s) {", ".join(unknown)}: choose from {", ".join(known)}')
    return args


def measure_all(args, processes, workdir):
    """Every part of the run that is not skipped; the data of main.json."""
    result = {'summary': {}}
    if 'throughput' in args.parts:
        cells, memory = measure.throughput(processes, workdir, args.servers, args.loads, args.rounds,
                                           args.duration, args.wrk_threads, args.fairness)
        result.update(cells=cells, summary=measure.summarize(cells), memory_after_load=memory)
    if 'reload' in args.parts:
        measure.log('rolling reload under load')
        result['reload'] = measure.reload_under_load(processes, workdir, 6 if args.quick else 12,
                                                     [2.5] if args.quick else [3.0, 7.5])
        measure.log(f'  reload: {result["reload"]["ok"]} ok, {result["reload"]["failed"]} failed')
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
    if missing := missing_tools(args.servers, args.parts):
        print('bench: this run needs, from the repository root:\n    ' + '\n    '.join(missing), file=sys.stderr)
        return 2

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    # Explicitly: a shell's background job starts with SIGINT ignored, and
    # SIGTERM would end the bench without its finally (and leave servers running).
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    workdir = tempfile.mkdtemp(prefix='zkprefork-bench-', dir=os.path.join(RESULTS_DIR, 'tmp'))
    processes = Processes()
    began = time.monotonic()
    command = 'python3 bench/run.py' + ' '.join([''] + sys.argv[1:])
    settings = {'rounds': args.rounds, 'duration': args.duration, 'servers': args.servers, 'loads': args.loads,
                'wrk_threads': args.wrk_threads, 'fairness_duration': args.fairness, 'command': command,
                'quick': args.quick}
    measure.log(f'bench: {command}; logs in {workdir}')
    try:
        result = {'machine': report.machine_info(), 'name': 'main', 'settings': settings,
                  **measure_all(args, processes, workdir)}
    finally:
        processes.stop_all()
    result['elapsed_s'] = time.monotonic() - began
    with open(os.path.join(out_dir, 'main.json'), 'w') as file:
        json.dump(result, file, indent=1)
    results_md, main_data = report.write_results(out_dir, args.quick)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    measure.log(f'done in {result["elapsed_s"] / 60:.1f} min: {results_md}')
    print_summary(main_data)
    return 0


def print_summary(main_data):
    if main_data['summary']:
        print('\n' + '\n'.join(report.peer_table(main_data)))
    print()
    for name, measured, ok in report.targets(main_data):
        print(f'{"PASS" if ok else "FAIL" if ok is not None else "    "}  {name}: {measured}')


if __name__ == '__main__':
    sys.exit(main())
