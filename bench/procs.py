"""Processes the benchmark starts, and how they are all stopped.

Every process goes through `Procs.start()`, in a session of its own
(start_new_session), so that at the end it can be stopped by its pid and
by its own process group, with every child pid seen in between: nothing
is ever looked up or killed by name. ZooKeeper, the ports and the waits
are zkprefork.testing's, as in the tests.
"""
import os
import signal
import socket
import subprocess
import time

import psutil

from zkprefork.testing import kill_tree


def http_ok(port, path='/', timeout=1.0):
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
            sock.sendall(f'GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n'.encode())
            return sock.recv(64).startswith(b'HTTP/1.') and True
    except OSError:
        return False


class Proc:
    """One started process: its Popen, log file and every descendant pid seen."""

    def __init__(self, name, argv, log_path, env=None, cwd=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.log_file = open(log_path, 'wb')
        self.popen = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                      env=env, cwd=cwd, start_new_session=True)
        self.pid = self.popen.pid
        self.started = time.monotonic()
        self.seen = set()

    def log(self):
        with open(self.log_path, 'rb') as file:
            return file.read().decode('utf-8', 'replace')

    def alive(self):
        return self.popen.poll() is None

    def children(self):
        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(child.pid for child in found)
        return found

    def titled(self, prefix):
        """Live children whose title starts with prefix (zkprefork's setproctitle)."""
        pids = []
        for child in self.children():
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if cmdline and cmdline[0].startswith(prefix):
                pids.append(child.pid)
        return pids

    def stop(self, grace=5.0):
        """SIGTERM, then SIGKILL: the process, its group, every pid it was seen with."""
        if self.alive():
            self.children()
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self):
        if self.alive():  # never once reaped: its pid could be another process's by now
            self.children()
            kill_tree(self.pid, self.seen)
        else:  # what it left behind
            for pid in self.seen:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # our own session's group: pgid == our child's pid
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if not self.log_file.closed:
            self.log_file.close()


class Procs:
    """The registry of everything started; `stop_all()` runs in a finally."""

    def __init__(self, directory):
        self.directory = directory
        self.all = []
        self._n = 0

    def start(self, name, argv, env=None, cwd=None):
        self._n += 1
        log_path = os.path.join(self.directory, f'{self._n:03d}-{name}.log')
        proc = Proc(name, argv, log_path, env=env, cwd=cwd)
        self.all.append(proc)
        return proc

    def stop(self, proc, grace=5.0):
        proc.stop(grace)

    def stop_all(self):
        for proc in reversed(self.all):
            try:
                proc.stop(grace=3.0)
            except Exception as error:  # keep stopping the others
                print(f'bench: could not stop {proc.name} (pid {proc.pid}): {error!r}')
