"""Hello-world A/B of two zkprefork checkouts, for a change to the worker's HTTP path.

    python3 bench/ab.py BEFORE_TREE AFTER_TREE [--rounds 3] [--connections 64] [--instructions]

Starts zkprefork from each tree (2 workers x 4 threads, bench/apps.py's
hello app, its own port) and runs `wrk -t1 -c64 -d3s` (-c: --connections) against them in
turn (A, B, A, B ...); prints req/s and the workers' CPU time per request
(user + system, from psutil) and context switches per request (voluntary
+ involuntary, all threads) for every round and their medians. On a
shared machine req/s swings with the neighbours' load: the CPU per
request swings less, and `--instructions` adds a count that does not
swing at all: the instructions (valgrind's callgrind) one worker's code
path takes per request, driven in-process on a socketpair (the request
parsed, the task run, the response sent), measured as the difference
between 4000 and 0 requests after a warm-up; and the same with the
worker's event loop in the path (LOOP_DRIVER: 32 connections on
socketpairs, the tree's loop -- zkprefork.eventloop if it has one,
else asyncore.poll2 -- run once per request with one connection ready,
and once per 32 requests with all of them ready; tasks run inline).

Everything started is stopped by process group in a `finally`.
"""
import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import psutil

DRIVER = '''
import logging, socket, sys
tree, count = sys.argv[1], int(sys.argv[2])
sys.path[:0] = [tree, tree + '/bench']
from zkprefork.worker import zopeserver
import apps
logging.disable(logging.CRITICAL)
class Dispatcher:
    def addTask(self, task):
        self.task = task
listening = socket.socket()
listening.bind(('127.0.0.1', 0))
listening.listen(5)
dispatcher = Dispatcher()
try:
    from zkprefork import settings
    from zkprefork.worker import httprequest
    extra = (None, httprequest.HTTPOptions.from_settings(settings.make_settings({})))
except (ImportError, AttributeError):  # a tree from before the HTTP options
    extra = ()
server = zopeserver.SharedSocketServer(listening, apps.app, None, '127.0.0.1', dispatcher, *extra)
ours, theirs = socket.socketpair()
ours.setblocking(False)
channel = server.channel_class(server, ours, ('127.0.0.1', 5555), server.adj)
channel.addr = ('127.0.0.1', 5555)
request = b'GET / HTTP/1.1\\r\\nHost: 127.0.0.1:8080\\r\\n\\r\\n'
for _ in range(1000 + count):
    channel.received(request)
    dispatcher.task.service()
    theirs.recv(65536)
'''

LOOP_DRIVER = '''
import asyncore, logging, socket, sys
tree, count, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path[:0] = [tree, tree + '/bench']
try:
    from zkprefork.worker import eventloop
    poll = eventloop.install().poll
except ImportError:
    poll = asyncore.poll2
from zkprefork.worker import httprequest, zopeserver
import apps
logging.disable(logging.CRITICAL)
zopeserver.fresh_wakeup()
class Inline:
    def addTask(self, task):
        task.service()
listening = socket.socket()
listening.bind(('127.0.0.1', 0))
listening.listen(5)
limits = httprequest.Limits(4094, 200, 65536, 262144, 1 << 30, 30.0)
server = zopeserver.SharedSocketServer(listening, apps.app, None, '127.0.0.1', Inline(), None, limits)
clients = []
for _ in range(32):
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    server.channel_class(server, ours, ('127.0.0.1', 5555), server.adj).addr = ('127.0.0.1', 5555)
    clients.append(theirs)
request = b'GET / HTTP/1.1\\r\\nHost: 127.0.0.1:8080\\r\\n\\r\\n'
for n in range((1000 + count) // ready):
    batch = clients[:ready] if ready == 32 else [clients[n % 32]]
    for client in batch:
        client.send(request)
    poll(0)
    for client in batch:
        client.recv(65536)
'''


def start(tree, port, label):
    ini = f'/tmp/zkprefork-ab-{label}-{os.getpid()}.ini'
    with open(ini, 'w') as file:
        file.write(f'[app:main]\nuse = call:apps:make_app\n\n[server:main]\nuse = egg:zkprefork\n'
                   f'host = 127.0.0.1\nport = {port}\nworkers = 2\nthreads = 4\n')
    env = dict(os.environ, PYTHONPATH=os.path.join(tree, 'bench'))
    return subprocess.Popen([sys.executable, '-m', 'zkprefork.cli', ini], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def workers_cpu(master):
    """The workers' CPU seconds (user + system) and context switches (voluntary + involuntary)."""
    children = psutil.Process(master.pid).children(recursive=True)
    return sum(sum(child.cpu_times()[:2]) for child in children), sum(map(context_switches, children))


def context_switches(process):
    """Of all its threads (psutil's num_ctx_switches counts the main thread's only)."""
    total = 0
    for task in os.listdir(f'/proc/{process.pid}/task'):
        try:
            with open(f'/proc/{process.pid}/task/{task}/status') as status:
                total += sum(int(line.split()[1]) for line in status if 'ctxt_switches' in line)
        except FileNotFoundError:
            pass  # a thread that just ended
    return total


def wrk_round(master, port, connections):
    before = workers_cpu(master)
    out = subprocess.run(['wrk', '-t1', f'-c{connections}', '-d3s', f'http://127.0.0.1:{port}/'],
                         capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r'(\d+) requests in', out).group(1))
    errors = re.search(r'Socket errors.*|Non-2xx.*', out)
    rate = float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1))
    cpu, switches = (after - earlier for after, earlier in zip(workers_cpu(master), before))
    return rate, cpu / requests * 1e6, switches / requests, errors.group(0) if errors else ''


def instructions(tree, driver=DRIVER, *extra):
    python = os.path.realpath(subprocess.run([sys.executable, '-c', 'import sys; print(sys.executable)'],
                                             capture_output=True, text=True).stdout.strip())
    counts = []
    for count in (0, 4000):
        out = subprocess.run(['valgrind', '--tool=callgrind', '--callgrind-out-file=/dev/null', python,
                              '-c', driver, tree, str(count), *extra], capture_output=True, text=True).stderr
        counts.append(int(re.search(r'Collected : (\d+)', out).group(1)))
    return (counts[1] - counts[0]) / 4000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('before')
    parser.add_argument('after')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--connections', type=int, default=64)
    parser.add_argument('--instructions', action='store_true')
    args = parser.parse_args()
    trees = {'before': (args.before, 18601), 'after': (args.after, 18602)}
    masters = {}
    results = {label: [] for label in trees}
    try:
        for label, (tree, port) in trees.items():
            masters[label] = start(tree, port, label)
        time.sleep(3)
        for round_number in range(1, args.rounds + 1):
            for label, (tree, port) in trees.items():
                rate, cpu, switches, errors = wrk_round(masters[label], port, args.connections)
                results[label].append((rate, cpu, switches))
                print(f'round {round_number} {label}: {rate:.0f} req/s, workers {cpu:.1f} µs CPU/request, '
                      f'{switches:.2f} context switches/request {errors}', flush=True)
    finally:
        for master in masters.values():
            os.killpg(master.pid, signal.SIGTERM)
        for master in masters.values():
            master.wait(30)
    for label, rounds in results.items():
        print(f'{label}: median {statistics.median(r[0] for r in rounds):.0f} req/s, '
              f'median {statistics.median(r[1] for r in rounds):.1f} µs CPU/request, '
              f'median {statistics.median(r[2] for r in rounds):.2f} context switches/request')
    if args.instructions:
        for label, (tree, _) in trees.items():
            print(f'{label}: {instructions(tree):,.0f} instructions/request (callgrind, in-process); '
                  f'with the loop: {instructions(tree, LOOP_DRIVER, "1"):,.0f} (1 of 32 connections ready), '
                  f'{instructions(tree, LOOP_DRIVER, "32"):,.0f} (32 of 32)', flush=True)


if __name__ == '__main__':
    main()
