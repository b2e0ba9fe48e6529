"""Issue 22's first lever: the GIL switch interval of a zkprefork worker,
measured where it could matter, on the CPU-bound Flask page.

    python3 bench/experiments/switchinterval.py [--rounds 3] [--duration 3]

A pool thread running the page holds the GIL; the worker's loop thread,
which needs it for every read, accept and wake-up, waits until the holder
is asked to drop it, after `sys.getswitchinterval()` (5 ms by default). A
shorter interval should shorten that wait (and the tail), at the cost of
more switches. Each variant is zkprefork serving bench/realapps.py with
`sys.setswitchinterval(S)` done at the application's import, in each worker
(swi_app.py); granian is the reference. Interleaved rounds, every server
started afresh each round; prints one row per (load, variant): median
req/s, p50, p99 and the server's CPU µs per request (all its processes).
"""
import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

from loads import run_wrk  # noqa: E402
from servers import Server, child_env  # noqa: E402
from zkprefork.testing import Processes, ProcessUnderTest  # noqa: E402

VARIANTS = {'zkprefork 5 ms (default)': None, 'zkprefork 1 ms': 0.001, 'zkprefork 0.2 ms': 0.0002,
            'zkprefork 20 ms': 0.02}
LOADS = ('page-ka64', 'page-ka16', 'api-ka64')


class SwitchingServer(Server):
    """zkprefork whose workers set the switch interval `seconds` (None: leave it)."""

    def __init__(self, seconds, *args, **kwargs):
        super().__init__('zkprefork', *args, app='swi_app' if seconds else 'realapps', **kwargs)
        self.seconds = seconds

    def start(self):
        env = child_env()
        env['PYTHONPATH'] = os.pathsep.join([HERE, env['PYTHONPATH']])
        if self.seconds:
            env['BENCH_SWITCHINTERVAL'] = repr(self.seconds)
        self.proc = self.processes.start(
            ProcessUnderTest(self.argv(), self.workdir, env=env, cwd=self.workdir, name=self.kind))
        return self


def one_round(processes, workdir, duration, cells):
    servers = {name: SwitchingServer(seconds, processes, workdir) for name, seconds in VARIANTS.items()}
    servers['granian'] = Server('granian', processes, workdir, app='realapps')
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready()
        for load in LOADS:
            for name, server in servers.items():
                result = run_wrk(server.port, load, duration, 1, server.cpu_seconds)
                cells.setdefault((load, name), []).append(result)
                print(f'{load:10} {name:26} {result["rps"]:7.0f} req/s p99 {result["p99_ms"]} ms '
                      f'CPU {result.get("server_cpu_us", 0):.0f} µs/req other {result["other_cpu_pct"]:.0f}%',
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--duration', type=int, default=3)
    args = parser.parse_args()
    cells = {}
    with tempfile.TemporaryDirectory() as workdir:
        processes = Processes()
        try:
            for _ in range(args.rounds):
                one_round(processes, workdir, args.duration, cells)
        finally:
            processes.stop_all()
    print('\n| load | server | req/s (median) | p50 ms | p99 ms | server CPU µs/req | other CPU % (max) |')
    print('|---|---|---:|---:|---:|---:|---:|')
    for (load, name), runs in cells.items():
        median = lambda key: statistics.median(run.get(key) or 0 for run in runs)  # noqa: E731
        print(f'| {load} | {name} | {median("rps"):.0f} | {median("p50_ms"):.2f} | {median("p99_ms"):.2f} '
              f'| {median("server_cpu_us"):.0f} | {max(run["other_cpu_pct"] for run in runs):.0f} |')


if __name__ == '__main__':
    main()
