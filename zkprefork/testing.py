"""Real processes for the tests, the demo and the benchmarks: a ZooKeeper
server from Debian's ``zookeeper`` package on 127.0.0.1, a zkprefork master,
any other command under test, and the waits and kills around them. Nothing
here is a mock.

Every process is started in a session of its own (so that a Ctrl-C at the
terminal is the caller's to handle, and so that its whole process group can
be killed), with its output in a log file, and is stopped by pid: never
looked up or killed by name.
"""
import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import psutil

ZOOKEEPER_CLASSPATH = '/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar'


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout=10.0, interval=0.02, message='condition'):
    """The first true value of condition(); AssertionError after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {message}')
        time.sleep(interval)


def kill_pids(pids):
    """SIGKILL each pid that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(pid, extra_pids=()):
    """SIGKILL a process, its descendants and any other pids we saw it start."""
    victims = set(extra_pids)
    try:
        process = psutil.Process(pid)
        victims.update(child.pid for child in process.children(recursive=True))
        victims.add(pid)
    except psutil.NoSuchProcess:
        pass
    kill_pids(victims)


def http_get(port, path='/', host='127.0.0.1', timeout=10.0, headers=None):
    """(status, body) of one GET on a connection of its own."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request('GET', path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class ClientThreads:
    """Client threads running `self._client(*arguments)`, one per entry
    of `arguments`, from the start of a with block to its end (or stop());
    `ok` counts the 200s, `failures` keeps everything else."""

    def __init__(self, port, arguments, path='/'):
        self.port, self.path = port, path
        self.stopping = threading.Event()
        self.ok, self.failures = 0, []
        self.threads = [threading.Thread(target=self._client, args=args, daemon=True) for args in arguments]

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


class NewConnections(ClientThreads):
    """`clients` threads that each send GET `path` on a new connection
    (``Connection: close``), again and again."""

    def __init__(self, port, clients, path='/'):
        super().__init__(port, [()] * clients, path)

    def _client(self):
        while not self.stopping.is_set():
            try:
                status, _ = http_get(self.port, self.path, headers={'Connection': 'close'})
            except OSError as error:
                self.failures.append(repr(error))
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(status)


class IdleClients(ClientThreads):
    """`clients` threads, each a keep-alive connection (plain http.client,
    which never probes a connection before reusing it) that sends GET `path`
    and idles 0.3-0.8 s before the next."""

    def __init__(self, port, clients, path='/'):
        seeds = random.Random(13)
        super().__init__(port, [(seeds.random(),) for _ in range(clients)], path)

    def _client(self, seed):
        idle = random.Random(seed)
        connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=15)
        while not self.stopping.is_set():
            try:
                connection.request('GET', self.path)
                response = connection.getresponse()
                response.read()
                if response.status == 200:
                    self.ok += 1
                else:
                    self.failures.append(response.status)
            except (OSError, http.client.HTTPException) as error:
                self.failures.append(repr(error))
                connection.close()
            time.sleep(idle.uniform(0.3, 0.8))
        connection.close()


class ProcessUnderTest:
    """A command run as a child process: `argv` (strings or not), its output
    (stdout and stderr) in a log file of its own under `directory`, `env`
    variables added to os.environ. Every descendant pid seen is remembered,
    so that `kill()` also reaches those its parent has lost."""

    def __init__(self, argv, directory, env=None, cwd=None, name=None):
        self.argv = [str(arg) for arg in argv]
        self.name = name or os.path.basename(self.argv[0])
        self.log_path = os.path.join(directory, f'{self.name}-{time.monotonic_ns()}.log')
        self.env = dict(os.environ, **(env or {}))
        self.cwd = cwd
        self.process = None
        self.seen_pids = set()

    def start(self):
        self.log_file = open(self.log_path, 'wb')
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
            env=self.env, cwd=self.cwd, start_new_session=True)
        self.started = time.monotonic()
        return self

    @property
    def pid(self):
        return self.process.pid

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def log(self):
        try:
            with open(self.log_path, encoding='utf-8', errors='replace') as file:
                return file.read()
        except FileNotFoundError:
            return ''

    def wait_for_log(self, pattern, timeout=15.0):
        """The first match of the regular expression in the log; AssertionError
        if the process exits first or after timeout s."""
        regex = re.compile(pattern)

        def found():
            match = regex.search(self.log())
            if not match and self.process.poll() is not None:
                raise AssertionError(f'{self.name} exited ({self.process.returncode}) before '
                                     f'logging {pattern!r}:\n{self.log()}')
            return match
        return wait_until(found, timeout, message=f'{pattern!r} in the log of {self.name}')

    def children(self):
        """Its live descendants (psutil.Process), remembered in seen_pids."""
        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update(child.pid for child in found)
        return found

    def titled(self, prefix):
        """Pids of the live descendants whose title (setproctitle) starts with prefix."""
        pids = set()
        for child in self.children():
            try:
                title = ' '.join(child.cmdline())
            except psutil.Error:
                continue
            if title.startswith(prefix):
                pids.add(child.pid)
        return pids

    def stop(self, signum=signal.SIGTERM, timeout=10.0):
        """Send signum (None: it was signalled already), wait up to timeout s,
        then kill() whatever is left. Returns the exit status (negative: the
        signal that ended it, -9 if it had to be killed)."""
        if self.process is None:
            return None
        if self.alive():
            self.children()
            if signum is not None:
                self.signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.process.returncode

    def kill(self):
        """SIGKILL the process, its descendants, every pid seen and its process group."""
        if self.process is None:
            return
        if self.alive():  # not reaped yet, so its pid is still its own
            self.children()
            kill_tree(self.pid, self.seen_pids)
        else:  # what it left behind
            kill_pids(self.seen_pids)
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its own session's group: pgid == its pid
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if not self.log_file.closed:
            self.log_file.close()

    # Defined after stop(), whose default is the signal module's SIGTERM.
    def signal(self, signum):
        self.process.send_signal(signum)  # a no-op once reaped: never another process's pid

    def wait(self, timeout=30.0):
        return self.process.wait(timeout)


class ZkpreforkMaster(ProcessUnderTest):
    """A zkprefork master started as `python -m zkprefork.cli ARGS` (or
    by another `command`: pserve, a script that calls the runner)."""

    command = (sys.executable, '-m', 'zkprefork.cli')

    def __init__(self, args, directory, env=None, cwd=None):
        super().__init__([*self.command, *args], directory, env, cwd, name='zkprefork')
        self.port = None

    def wait_serving(self, timeout=15.0):
        """Wait until every worker is ready; sets self.port from the log."""
        self.wait_for_log(r'worker\(s\) ready, serving at', timeout)
        self.port = int(self.wait_for_log(r'listening at https?://\S+:(\d+)').group(1))
        self.children()
        return self

    def worker_pids(self):
        """Pids of the live workers (children titled 'zkprefork: worker')."""
        return self.titled('zkprefork: worker')

    def request(self, path='/', timeout=10.0, host='127.0.0.1'):
        return http_get(self.port, path, host, timeout)


class Processes:
    """Everything started through start(); kill_all() (or stop_all()) in a finally."""

    def __init__(self):
        self.started = []

    def start(self, process):
        self.started.append(process)
        return process.start()

    def stop_all(self, timeout=3.0):
        """SIGTERM each, newest first, then kill what is left after timeout s."""
        for process in reversed(self.started):
            try:
                process.stop(timeout=timeout)
            except Exception as error:  # noqa: BLE001 - keep stopping the others
                print(f'could not stop {process.name} (pid {process.pid}): {error!r}', file=sys.stderr)

    def kill_all(self):
        for process in reversed(self.started):
            process.kill()


def four_letter_word(port, word, timeout=1.0):
    """ZooKeeper's answer to a four-letter command, or '' if none."""
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
            sock.sendall(word.encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b''.join(chunks).decode(errors='replace')
    except OSError:
        return ''


class ZooKeeperServer:
    """A standalone ZooKeeper on 127.0.0.1, a free port and a data dir of its
    own (a new one under `directory`, default: the temporary directory), run
    in the foreground as a child process. `extra` zoo.cfg lines and JVM
    options; `restart()` keeps the port and the data. The default
    tickTime of 200 ms allows sessions as short as 400 ms."""

    main_class = 'org.apache.zookeeper.server.ZooKeeperServerMain'

    def __init__(self, extra='', jvm_options=(), classpath=ZOOKEEPER_CLASSPATH, tick_time=200, directory=None):
        self.directory = tempfile.mkdtemp(prefix='zkprefork-zk-', dir=directory)
        self.port = free_port()
        self.extra = textwrap.dedent(extra)
        self.jvm_options = list(jvm_options)
        self.classpath = classpath
        self.tick_time = tick_time
        self.process = None

    @classmethod
    def from_config(cls, path, **options):
        """One configured as the zoo.cfg at `path` says, but with a fresh data
        dir and a free port on 127.0.0.1 (the settings config_text() writes
        replace the file's)."""
        settings = {}
        with open(path, encoding='utf-8') as file:
            for line in file:
                key, sep, value = line.strip().partition('=')
                if sep and not key.startswith('#'):
                    settings[key.strip()] = value.strip()
        server = cls(tick_time=int(settings.pop('tickTime', 2000)), **options)
        ours = {line.partition('=')[0] for line in server.config_text().splitlines()}
        server.extra = ''.join(f'{key}={value}\n' for key, value in settings.items() if key not in ours)
        return server

    @property
    def hosts(self):
        return f'127.0.0.1:{self.port}'

    def config_text(self):
        return textwrap.dedent(f'''\
            tickTime={self.tick_time}
            dataDir={self.directory}/data
            clientPort={self.port}
            clientPortAddress=127.0.0.1
            maxClientCnxns=0
            admin.enableServer=false
            4lw.commands.whitelist=ruok,srvr,stat,mntr,cons
            ''') + self.extra

    def start(self, wait=True):
        os.makedirs(os.path.join(self.directory, 'data'), exist_ok=True)
        config = os.path.join(self.directory, 'zoo.cfg')
        with open(config, 'w') as file:
            file.write(self.config_text())
        self.process = ProcessUnderTest(
            ['java', *self.jvm_options, '-cp', self.classpath, self.main_class, config],
            self.directory, name='zookeeper').start()
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout=30.0):
        wait_until(self.serving, timeout, message=f'ZooKeeper on port {self.port} to serve')
        return self

    def serving(self):
        if not self.process.alive():
            raise AssertionError(f'ZooKeeper exited ({self.process.process.returncode}) at start; '
                                 f'its log:\n{self.process.log()[-3000:]}')
        return 'Mode: ' in four_letter_word(self.port, 'srvr')

    def restart(self, down_for=0.0):
        self.stop()
        time.sleep(down_for)  # the outage is the scenario
        return self.start()

    def stop(self):
        """SIGTERM (ZooKeeper exits ~0.3 s later), SIGKILL after 10 s; the exit status."""
        return self.process.stop(timeout=10) if self.process else None

    def kill(self):
        self.process.kill()

    def session_ids(self):
        """The session ids of the clients connected to this server."""
        return {int(sid, 16) for sid in re.findall(r'sid=0x([0-9a-f]+)', four_letter_word(self.port, 'cons'))}
