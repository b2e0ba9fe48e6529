"""Real processes for tests, the demo and the benchmarks: a ZooKeeper server
from Debian's ``zookeeper`` package on 127.0.0.1, and the little waits and
kills around them. Nothing here is a mock.
"""
import os
import re
import signal
import socket
import subprocess
import tempfile
import textwrap
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


def kill_tree(pid, extra_pids=()):
    """SIGKILL a process, its descendants and any other pids we saw it start."""
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
    own, run in the foreground as a child process. `extra` zoo.cfg lines and
    JVM options; `restart()` keeps the port and the data. The default
    tickTime of 200 ms allows sessions as short as 400 ms."""

    main_class = 'org.apache.zookeeper.server.ZooKeeperServerMain'

    def __init__(self, extra='', jvm_options=(), classpath=ZOOKEEPER_CLASSPATH, tick_time=200):
        self.directory = tempfile.mkdtemp(prefix='zkprefork-zk-')
        self.port = free_port()
        self.extra = textwrap.dedent(extra)
        self.jvm_options = list(jvm_options)
        self.classpath = classpath
        self.tick_time = tick_time
        self.process = None

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
        self.log = open(os.path.join(self.directory, 'zookeeper.log'), 'ab')
        self.process = subprocess.Popen(
            ['java', *self.jvm_options, '-cp', self.classpath, self.main_class, config],
            stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            wait_until(self.serving, timeout=30, message=f'ZooKeeper on port {self.port} to serve')
        return self

    def serving(self):
        if self.process.poll() is not None:
            raise AssertionError(f'ZooKeeper exited ({self.process.returncode}); see {self.directory}')
        return 'Mode: ' in four_letter_word(self.port, 'srvr')

    def restart(self, down_for=0.0):
        self.stop()
        time.sleep(down_for)
        return self.start()

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

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.log.close()

    def session_ids(self):
        """The session ids of the clients connected to this server."""
        return {int(sid, 16) for sid in re.findall(r'sid=0x([0-9a-f]+)', four_letter_word(self.port, 'cons'))}
