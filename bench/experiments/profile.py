"""Profile one zkprefork worker under a load of bench/loads.py (default: hello world, 64 connections).

    python3 bench/experiments/profile.py [--seconds 8] [--load page-ka64] [--out FILE]

Starts zkprefork (2 workers x 4 threads, serving the load's app, over TLS for a tls- load),
runs `wrk -t2` with the load's connections, path and headers on 127.0.0.1, records worker 0 with
`py-spy record --nonblocking --threads --format raw` (py-spy comes with
`pip install -e '.[bench]'`) and prints the share of samples per thread kind, per function
(inclusive) and per top frame.  Everything started is stopped by pid.
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]  # bench's modules, this checkout's zkprefork

from loads import LOADS  # noqa: E402
from servers import Server, make_certificates  # noqa: E402
from zkprefork.testing import Processes, ProcessUnderTest  # noqa: E402


def summarize(raw_path, top=45):
    inclusive, self_time, threads = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    with open(raw_path) as file:
        for line in file:
            stack, _, count = line.rstrip().rpartition(' ')
            count = int(count)
            total += count
            frames = stack.split(';')
            threads['asyncore loop (MainThread)' if 'MainThread' in frames[0] else 'pool threads'] += count
            seen = set()
            for frame in frames[1:]:
                name = re.sub(r':\d+\)$', ')', frame)
                if name not in seen:
                    inclusive[name] += count
                    seen.add(name)
            self_time[re.sub(r':\d+\)$', ')', frames[-1])] += count
    lines = [f'{total} samples']
    lines += [f'{n / total * 100:5.1f}%  {k}' for k, n in threads.items()]
    lines += ['', '--- inclusive']
    lines += [f'{n / total * 100:5.1f}%  {k}' for k, n in inclusive.most_common(top)
              if 'zkprefork/cli.py' not in k and 'runpy' not in k]
    lines += ['', '--- self']
    lines += [f'{n / total * 100:5.1f}%  {k}' for k, n in self_time.most_common(25)]
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--seconds', type=int, default=8)
    parser.add_argument('--load', default='hello-ka64', choices=list(LOADS))
    parser.add_argument('--out')
    args = parser.parse_args()
    if shutil.which('py-spy') is None:
        sys.exit("profile.py needs py-spy: pip install -e '.[bench]'")
    kind = 'zkprefork'
    workdir = tempfile.mkdtemp(prefix='zkprefork-profile-')
    processes = Processes()
    raw = os.path.join(workdir, 'profile.raw')
    try:
        spec = LOADS[args.load]
        server = Server(kind, processes, workdir, app=spec.app,
                        tls=make_certificates(workdir) if spec.tls else None).start().wait_ready()
        worker = sorted(server.worker_pids())[0]
        url = f'{"https" if spec.tls else "http"}://127.0.0.1:{server.port}{spec.path}'
        load = processes.start(ProcessUnderTest(['wrk', '-t2', f'-c{spec.conns}', f'-d{args.seconds + 4}s',
                                                 *(a for h in spec.headers for a in ('-H', h)), url], workdir))
        time.sleep(2)
        subprocess.run(['py-spy', 'record', '-p', str(worker), '-d', str(args.seconds), '-r', '200',
                        '--nonblocking', '--threads', '--format', 'raw', '-o', raw],
                       check=True, capture_output=True)
        load.wait(args.seconds + 30)
        print(f'{kind}: wrk {load.log().split("Requests/sec:")[-1].strip().splitlines()[0]} req/s')
        text = summarize(raw)
    finally:
        processes.stop_all()
    print(text)
    if args.out:
        with open(args.out, 'w') as file:
            file.write(f'{kind}, worker 0 under wrk -t2, {LOADS[args.load].description}\n{text}\n')
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
