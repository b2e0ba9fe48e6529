#!/usr/bin/env python3
"""zkprefork's demo, from a checkout: ``python3 etc/demo.py [--serve]``.

1. starts a local ZooKeeper (Debian's ``zookeeper`` package) in the
   foreground, with etc/zoo.cfg's settings but a fresh temporary dataDir and
   a free port on 127.0.0.1, and waits until it serves (``srvr``);
2. starts ``zkprefork etc/demo.ini --workers 4 --zookeeper 127.0.0.1:PORT``;
3. waits for its node under /demo/providers and shows it (name and JSON
   data), also as ZooKeeper's own client (zkCli.sh) lists it;
4. finds the server's address in that node, as a client would, and makes
   ~20 requests, each on a new connection, showing which workers answered;
5. sends SIGTERM to the master and shows that the node is gone and that
   zkprefork exited with status 0; stops ZooKeeper; exits 0.

With ``--serve`` it keeps everything running after step 4 until Ctrl-C (or
SIGTERM), then stops as in step 5. Every process it starts is stopped, by
pid, whatever happens. Everything listens on 127.0.0.1 only.
"""
import argparse
import collections
import configparser
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
sys.path.insert(0, CHECKOUT)  # this checkout's zkprefork, as the server it starts (cwd=CHECKOUT)

from zkprefork.testing import ZkpreforkMaster, ZooKeeperServer, http_get, kill_tree, wait_until  # noqa: E402

ZOO_CFG = os.path.join(HERE, 'zoo.cfg')
DEMO_INI = os.path.join(HERE, 'demo.ini')
ZOOKEEPER_JAR = '/usr/share/java/zookeeper.jar'
ZKCLI = '/usr/share/zookeeper/bin/zkCli.sh'


class DemoError(Exception):
    """Something went wrong: reported as one message, exit status 1."""


class Stop(Exception):
    """Ctrl-C or SIGTERM reached the demo."""


_deferring = []  # non-empty while a child is being started
_pending = []  # a signal that arrived meanwhile


def _stop_requested(signum, frame):
    if _deferring:
        _pending.append(signum)
        return
    raise Stop(signal.Signals(signum).name)


class signals_deferred:
    """Ctrl-C and SIGTERM wait while a child is started and remembered, so
    that no child is ever started without the demo knowing its pid. (Not by
    blocking them: children would inherit the blocked signal mask.)"""

    def __enter__(self):
        _deferring.append(True)

    def __exit__(self, *exc_info):
        _deferring.pop()
        if _pending and not _deferring and exc_info[0] is None:
            raise Stop(signal.Signals(_pending.pop()).name)


def say(message=''):
    print(message, flush=True)


def indented(text, prefix='    '):
    return '\n'.join(prefix + line for line in text.rstrip().splitlines())


def start_zookeeper(directory):
    """etc/zoo.cfg's ZooKeeper, with a fresh dataDir and a free port on 127.0.0.1."""
    if not os.path.exists(ZOOKEEPER_JAR):
        raise DemoError(f'{ZOOKEEPER_JAR} is missing: apt-get install -y zookeeper')
    zookeeper = ZooKeeperServer.from_config(ZOO_CFG, directory=directory)
    with signals_deferred():
        zookeeper.start(wait=False)
    started = time.monotonic()
    try:
        zookeeper.wait_serving()
    except AssertionError as error:
        raise DemoError(str(error)) from None
    say(f'ZooKeeper (pid {zookeeper.process.pid}) serves at {zookeeper.hosts}, '
        f'{time.monotonic() - started:.2f} s after start')
    return zookeeper


def start_zkprefork(directory, zookeeper_hosts, workers):
    """``zkprefork etc/demo.ini --workers N --zookeeper HOSTS`` as a child."""
    args = ['--workers', str(workers), '--zookeeper', zookeeper_hosts]
    server = ZkpreforkMaster([DEMO_INI, *args], directory, cwd=CHECKOUT)
    with signals_deferred():
        server.start()
    shown = ['zkprefork', os.path.relpath(DEMO_INI, CHECKOUT), *args]
    say(f'started `{" ".join(shown)}` (master pid {server.pid})')
    return server


def check_running(server):
    if not server.alive():
        raise DemoError(f'zkprefork exited ({server.process.returncode}) unexpectedly:\n'
                        + indented(server.log()))


def titles(server):
    """(pid, title) of the master's children: its workers and registrar."""
    found = []
    for child in server.children():
        try:
            found.append((child.pid, ' '.join(child.cmdline())))
        except psutil.NoSuchProcess:
            pass
    return sorted(found)


def stop_child(process, name, timeout, signum=signal.SIGTERM):
    """Stop a child by pid (killing it and its descendants after timeout s);
    its exit status."""
    status = process.stop(signum, timeout)
    if status == -signal.SIGKILL:
        say(f'{name} (pid {process.pid}) did not stop within {timeout:g} s: killed it')
    return status


def service_path():
    """The path of etc/demo.ini's [server:main] section."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(DEMO_INI, encoding='utf-8')
    return parser.get('server:main', 'path')


def show_zkcli(zookeeper, path):
    if not os.path.exists(ZKCLI):
        say(f'({ZKCLI} is not installed: skipping ZooKeeper\'s own client)')
        return
    command = [ZKCLI, '-server', zookeeper.hosts, 'ls', path]
    process = None
    try:
        with signals_deferred():
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        stdout, stderr = process.communicate(timeout=60)
    except BaseException as error:
        if process is not None:
            kill_tree(process.pid)  # zkCli.sh runs java as its child
            process.communicate()
        if not isinstance(error, subprocess.TimeoutExpired):
            raise
        say(f'`{" ".join(command)}` did not answer within 60 s')
        return
    # zkCli.sh prints its connection chatter before the answer: keep the answer.
    answer = [line for line in stdout.splitlines() if line.startswith('[')]
    say(f'ZooKeeper\'s own client: `{" ".join(command)}` prints:')
    say(indented('\n'.join(answer) or stdout or stderr or f'nothing (exit status {process.returncode})'))


def make_requests(address, port, count):
    answered_by = collections.Counter()
    for _ in range(count):
        status, body = http_get(port, host=address, headers={'Connection': 'close'})
        body = body.decode('utf-8', errors='replace')
        match = re.search(r'\(pid (\d+)\)', body)
        if status != 200 or not match:
            raise DemoError(f'unexpected answer: {status} {body!r}')
        answered_by[int(match.group(1))] += 1
    return answered_by


def run(args, directory):
    from kazoo.client import KazooClient  # the demo's client, not the server's

    say(f'demo files (config, data and logs) in {directory}')
    # kazoo warns on stderr when its first connection attempt races ZooKeeper's
    # start-up, and then reconnects: its log goes to a file.
    kazoo_log = logging.getLogger('kazoo')
    kazoo_log.addHandler(logging.FileHandler(os.path.join(directory, 'kazoo-client.log')))
    kazoo_log.propagate = False
    zookeeper = server = client = None
    try:
        zookeeper = start_zookeeper(directory)
        started = time.monotonic()
        server = start_zkprefork(directory, zookeeper.hosts, args.workers)
        path = service_path()
        client = KazooClient(hosts=zookeeper.hosts)
        client.start(15)

        def registered():
            check_running(server)
            return client.exists(path) and client.get_children(path)
        nodes = wait_until(registered, 60, message=f'a node under {path}')
        say(f'registered {time.monotonic() - started:.2f} s after start:')
        for name in nodes:
            data, stat = client.get(f'{path}/{name}')
            say(f'    node {path}/{name}')
            say(f'    data {data.decode()}')
            say(f'    ephemeral (session 0x{stat.ephemeralOwner:x}), ACL '
                + ', '.join(f'{acl.id.scheme}:{acl.id.id} {"/".join(acl.acl_list)}'
                            for acl in client.get_acls(f'{path}/{name}')[0]))
        show_zkcli(zookeeper, path)

        say(f'the master (pid {server.pid}) and its children:')
        for pid, title in titles(server):
            say(f'    pid {pid}: {title}')

        # A client's view: the address comes from ZooKeeper.
        address, _, port = nodes[0].rpartition(':')
        address = address.strip('[]')
        answered_by = make_requests(address, int(port), args.requests)
        say(f'{args.requests} requests to http://{nodes[0]}/, one connection each, answered by '
            f'{len(answered_by)} worker(s):')
        for pid, count in sorted(answered_by.items()):
            say(f'    worker pid {pid}: {count} request(s)')

        if args.serve:
            say(f'serving at http://{nodes[0]}/ (try /sleep?s=5 and /environ); '
                f'zkprefork\'s log: {server.log_path}')
            say('press Ctrl-C to stop')
            try:
                while True:
                    check_running(server)
                    time.sleep(0.5)
            except Stop:
                say()

        return stop_and_show(server, client, path)
    except Stop as stop:
        say(f'\n{stop}: stopping')
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if client is not None:
            try:
                client.stop()
                client.close()
            except Exception:  # noqa: BLE001 - the cleanup must go on
                pass
        if server is not None and server.alive():
            say(f'stopping zkprefork (pid {server.pid}) with SIGTERM')
            stop_child(server, 'zkprefork', 60)
        if zookeeper is not None:
            stop_child(zookeeper.process, 'ZooKeeper', 10)
            say(f'ZooKeeper (pid {zookeeper.process.pid}) stopped')


def stop_and_show(server, client, path):
    """SIGTERM to the master: the node goes first, then the master exits 0."""
    say(f'sending SIGTERM to the master (pid {server.pid})')
    sent = time.monotonic()
    server.signal(signal.SIGTERM)
    wait_until(lambda: not client.get_children(path), 30, message='the node to go')
    say(f'    the node is gone after {time.monotonic() - sent:.2f} s: '
        f'{path} has children {client.get_children(path)}')
    status = stop_child(server, 'zkprefork', 60, signum=None)  # only wait: it has had its SIGTERM
    say(f'    zkprefork exited with status {status} after {time.monotonic() - sent:.2f} s')
    say('zkprefork\'s log:')
    say(indented(server.log()))
    if status != 0:
        raise DemoError(f'zkprefork exited with status {status}')
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--serve', action='store_true',
                        help='keep serving until Ctrl-C instead of stopping at once')
    parser.add_argument('--workers', type=int, default=4, help='worker processes (default 4)')
    parser.add_argument('--requests', type=int, default=20, help='requests to make (default 20)')
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, _stop_requested)
    signal.signal(signal.SIGTERM, _stop_requested)
    directory = tempfile.mkdtemp(prefix='zkprefork-demo-')
    try:
        return run(args, directory)
    except (DemoError, AssertionError) as error:  # AssertionError: a wait timed out
        say(f'demo failed: {error}')
        return 1
    except Stop as stop:  # during the cleanup itself
        say(f'\n{stop}: stopping')
        return 130
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
