"""Real processes for the tests: a ZooKeeper server and zkprefork masters.

Nothing here is a mock: ZooKeeper is Debian's, started on 127.0.0.1 with a
free port and a temporary data dir; zkprefork runs as its own command. Every
process started here is stopped by pid (and by process group, so that no
orphan survives a test that kills its master).
"""
import collections
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil

ZOOKEEPER_CLASSPATH = '/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar'
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout=10.0, interval=0.02, message='condition'):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {message}')
        time.sleep(interval)


def kill_tree(pid, extra_pids=()):
    """SIGKILL a process, its descendants and any pids we saw it start."""
    victims = set(extra_pids)
    try:
        process = psutil.Process(pid)
        victims.update(child.pid for child in process.children(recursive=True))
        victims.add(pid)
    except psutil.NoSuchProcess:
        pass
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class ZooKeeperServer:
    """A standalone ZooKeeper server on 127.0.0.1 (tickTime 200 ms, so that
    sessions may be as short as 400 ms)."""

    def __init__(self, tick_time=200):
        self.directory = tempfile.mkdtemp(prefix='zkprefork-zk-')
        self.port = free_port()
        self.tick_time = tick_time
        self.process = None

    @property
    def hosts(self):
        return f'127.0.0.1:{self.port}'

    def start(self):
        config = os.path.join(self.directory, 'zoo.cfg')
        with open(config, 'w') as file:
            file.write(textwrap.dedent(f'''\
                tickTime={self.tick_time}
                dataDir={self.directory}/data
                clientPort={self.port}
                clientPortAddress=127.0.0.1
                maxClientCnxns=0
                admin.enableServer=false
                4lw.commands.whitelist=ruok,srvr,stat,mntr,cons
                '''))
        self.log = open(os.path.join(self.directory, 'zookeeper.log'), 'wb')
        self.process = subprocess.Popen(
            ['java', '-cp', ZOOKEEPER_CLASSPATH,
             'org.apache.zookeeper.server.ZooKeeperServerMain', config],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self.ruok, timeout=30, message='ZooKeeper to answer ruok')
        return self

    def ruok(self):
        try:
            with socket.create_connection(('127.0.0.1', self.port), timeout=1) as sock:
                sock.sendall(b'ruok')
                return sock.recv(4) == b'imok'
        except OSError:
            return False

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.log.close()


def write_ini(directory, server_options='', app='egg:zkprefork#demo', extra=''):
    """An ini with the demo app and a [server:main] section."""
    path = os.path.join(directory, 'app.ini')
    with open(path, 'w') as file:
        file.write(f'[app:main]\nuse = {app}\n\n[server:main]\nuse = egg:zkprefork\n')
        file.write(textwrap.dedent(server_options))
        file.write(textwrap.dedent(extra))
    return path


class Server:
    """A zkprefork master started as `python -m zkprefork.cli ARGS`."""

    def __init__(self, args, directory, env=None):
        self.args = [str(arg) for arg in args]
        self.log_path = os.path.join(directory, f'zkprefork-{time.monotonic_ns()}.log')
        self.env = dict(os.environ, **(env or {}))
        self.process = None
        self.seen_pids = set()

    def start(self):
        self.log_file = open(self.log_path, 'wb')
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'zkprefork.cli', *self.args],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True)
        return self

    @property
    def pid(self):
        return self.process.pid

    def log(self):
        with open(self.log_path, encoding='utf-8', errors='replace') as file:
            return file.read()

    def wait_for_log(self, pattern, timeout=15.0):
        regex = re.compile(pattern)

        def found():
            match = regex.search(self.log())
            if not match and self.process.poll() is not None:
                raise AssertionError(f'zkprefork exited ({self.process.returncode}) before '
                                     f'logging {pattern!r}:\n{self.log()}')
            return match
        return wait_until(found, timeout, message=f'{pattern!r} in the log')

    def wait_serving(self, timeout=15.0):
        self.wait_for_log(r'worker\(s\) ready, serving at', timeout)
        self.port = int(self.wait_for_log(r'listening at http://\S+:(\d+)').group(1))
        self.remember_children()
        return self

    def remember_children(self):
        for child in self.children():
            self.seen_pids.add(child.pid)

    def children(self):
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def worker_pids(self):
        """Pids of the live workers (children titled 'zkprefork: worker')."""
        pids = set()
        for child in self.children():
            try:
                if child.cmdline() and child.cmdline()[0].startswith('zkprefork: worker'):
                    pids.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        self.seen_pids |= pids
        return pids

    def request(self, path='/', timeout=10.0, host='127.0.0.1'):
        connection = http.client.HTTPConnection(host, self.port, timeout=timeout)
        try:
            connection.request('GET', path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def signal(self, signum):
        os.kill(self.pid, signum)

    def wait(self, timeout=30.0):
        return self.process.wait(timeout)

    def stop(self):
        """Kill whatever is left: the master, its children, every pid seen."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.remember_children()
        kill_tree(self.pid, self.seen_pids)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(10)
        self.log_file.close()


def node_data(zk, node):
    data, _ = zk.get(node)
    return json.loads(data)


class Load:
    """Concurrent keep-alive HTTP clients hammering a server until stopped.

    Each client keeps one connection open and reconnects only when the
    server says `Connection: close`; any other failure (refused, reset, a
    connection closed without a response, a non-200) is counted.
    """

    def __init__(self, port, clients=50, path='/'):
        import threading
        self.port = port
        self.path = path
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures = []
        self.bodies = collections.Counter()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def _client(self):
        connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
        while not self.stopping.is_set():
            try:
                connection.request('GET', self.path)
                response = connection.getresponse()
                body = response.read()
                ok = response.status == 200
                if response.will_close:
                    connection.close()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                body, ok = repr(error).encode(), False
            with self.lock:
                if ok:
                    self.ok += 1
                    self.bodies[body] += 1
                else:
                    self.failures.append(body)
        connection.close()

    def wait_for(self, count, timeout=30):
        start = self.ok
        wait_until(lambda: self.ok >= start + count, timeout, message=f'{count} more responses')
