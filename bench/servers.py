"""The servers under test: how each is started, known to be ready, and
which of its processes are workers.

Every server serves bench/apps.py's `app` with WORKERS processes × THREADS
threads (waitress, a single process, gets all the threads), on 127.0.0.1
and a free port, as a zkprefork.testing.ProcessUnderTest: in a session of
its own, its output in a log file, stopped by pid and process group.

    KINDS        every server kind, in the order of the tables
    TLS_KINDS    the kinds that terminate TLS themselves (what the TLS table compares)
    Server       one running server of a kind
    make_certificates  a test CA and a server certificate for 127.0.0.1, made once per run
"""
import http.client
import os
import ssl
import sys
import sysconfig

import psutil

from zkprefork.testing import ProcessUnderTest, free_port, http_get, wait_until

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
SCRIPTS = sysconfig.get_path('scripts')  # console scripts of this interpreter's packages (the bench extra)

WORKERS, THREADS = 2, 4


def child_env():
    """Variables for a server: bench/ (apps.py) and this checkout (zkprefork) first on the path."""
    return {'PYTHONPATH': os.pathsep.join(filter(None, [BENCH, REPO, os.environ.get('PYTHONPATH')])),
            'PYTHONUNBUFFERED': '1'}


def write_ini(directory, port, workers=WORKERS, threads=THREADS, extra='', app='apps'):
    path = os.path.join(directory, f'zkprefork-{port}.ini')
    with open(path, 'w') as file:
        file.write(f'[app:main]\nuse = call:{app}:make_app\n\n'
                   '[server:main]\nuse = egg:zkprefork\n'
                   f'host = 127.0.0.1\nport = {port}\nworkers = {workers}\nthreads = {threads}\n'
                   + extra)
    return path


# kind -> (what it is, for the report; the log line that each worker prints once booted)
KINDS = {
    'zkprefork': ('zkprefork `python -m zkprefork.cli INI`', None),
    'gunicorn-gthread': ('gunicorn `-k gthread -w 2 --threads 4`', 'Booting worker with pid'),
    'gunicorn-sync': ('gunicorn `-k sync -w 2`', 'Booting worker with pid'),
    'waitress': ('waitress `--threads=8` (one process; `--connection-limit=2000 --asyncore-use-poll`, '
                 'without which it cannot take 1000 connections)', 'Serving on'),
    'uwsgi': ('uWSGI (pyuwsgi wheel) `--http11-socket --master --processes 2 --threads 4 --thunder-lock '
              '--listen 1024 --disable-logging`', 'spawned uWSGI worker'),
    'granian': ('granian `--interface wsgi --workers 2 --blocking-threads 4`', 'Started worker-'),
}
# TLS options of each kind that has them, given (certfile, keyfile). waitress
# has no TLS; the pyuwsgi wheel is built without OpenSSL (no --https-socket).
TLS_KINDS = {
    'zkprefork': lambda cert, key: [],  # in its ini: see Server.argv
    'gunicorn-gthread': lambda cert, key: ['--certfile', cert, '--keyfile', key],
    'gunicorn-sync': lambda cert, key: ['--certfile', cert, '--keyfile', key],
    'granian': lambda cert, key: ['--ssl-certificate', cert, '--ssl-keyfile', key],
}


def make_certificates(directory):
    """(certfile, keyfile) for 127.0.0.1 from a trustme test CA, written once
    into directory, the same files for every server. The key is PKCS#8
    (granian reads no other format); the CA is not kept: clients do not verify
    (see loadgen.py --tls)."""
    import trustme
    from cryptography.hazmat.primitives import serialization
    leaf = trustme.CA().issue_cert('127.0.0.1', 'localhost')
    certfile, keyfile = os.path.join(directory, 'server.pem'), os.path.join(directory, 'server.key')
    leaf.cert_chain_pems[0].write_to_path(certfile)
    for blob in leaf.cert_chain_pems[1:]:
        blob.write_to_path(certfile, append=True)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    with open(keyfile, 'wb') as file:
        file.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return certfile, keyfile


class Server:
    """A server of one of KINDS under test: start() it through `processes`
    (a zkprefork.testing.Processes), wait_ready(), then stop()."""

    def __init__(self, kind, processes, workdir, port=None, workers=WORKERS, threads=THREADS, ini_extra='',
                 app='apps', tls=None):
        """app: the module whose `app` it serves (bench/apps.py or realapps.py);
        tls: None, or (certfile, keyfile) to serve HTTPS."""
        if kind not in KINDS:
            raise ValueError(f'unknown server {kind!r}: one of {", ".join(KINDS)}')
        if tls and kind not in TLS_KINDS:
            raise ValueError(f'{kind} does not serve TLS: one of {", ".join(TLS_KINDS)}')
        self.app, self.tls = app, tls
        self.kind = kind
        self.processes = processes
        self.port = port or free_port()
        self.workers = workers
        self.threads = threads
        self.workdir = workdir
        self.ini_extra = ini_extra
        self.proc = None

    def argv(self):
        argv = self._plain_argv()
        if self.tls and self.kind != 'zkprefork':
            argv += TLS_KINDS[self.kind](*self.tls)
        return argv

    def _plain_argv(self):
        py, bind, module = sys.executable, f'127.0.0.1:{self.port}', f'{self.app}:app'
        workers, threads = str(self.workers), str(self.threads)
        if self.kind == 'zkprefork':
            tls = f'certfile = {self.tls[0]}\nkeyfile = {self.tls[1]}\n' if self.tls else ''
            return [py, '-m', 'zkprefork.cli', write_ini(self.workdir, self.port, self.workers, self.threads,
                                                         self.ini_extra + tls, self.app)]
        if self.kind == 'gunicorn-gthread':
            return [py, '-m', 'gunicorn', '-w', workers, '-k', 'gthread', '--threads', threads, '-b', bind, module]
        if self.kind == 'gunicorn-sync':
            return [py, '-m', 'gunicorn', '-w', workers, '-k', 'sync', '-b', bind, module]
        if self.kind == 'waitress':
            # Single process, so all the threads in one; its default connection
            # limit (100) and select() would refuse the 1000-connection load.
            return [py, '-m', 'waitress', f'--threads={self.workers * self.threads}', f'--listen={bind}',
                    '--connection-limit=2000', '--asyncore-use-poll', module]
        if self.kind == 'uwsgi':
            # http11-socket keeps connections alive (plain --http-socket does not).
            return [os.path.join(SCRIPTS, 'uwsgi'), '--http11-socket', bind, '--master', '--processes', workers,
                    '--threads', threads, '--module', module, '--disable-logging', '--thunder-lock',
                    '--listen', '1024']
        return [py, '-m', 'granian', '--interface', 'wsgi', '--host', '127.0.0.1', '--port', str(self.port),
                '--workers', workers, '--blocking-threads', threads, module]

    def start(self):
        self.proc = self.processes.start(
            ProcessUnderTest(self.argv(), self.workdir, env=child_env(), cwd=self.workdir, name=self.kind))
        return self

    def ready(self):
        if not self.proc.alive():
            raise RuntimeError(f'{self.kind} exited ({self.proc.process.returncode}):\n{self.proc.log()[-3000:]}')
        text = self.proc.log()
        booted = KINDS[self.kind][1]
        if self.kind == 'zkprefork':
            up = 'worker(s) ready, serving at' in text
        elif self.kind == 'waitress':
            up = booted in text
        else:
            up = text.count(booted) >= self.workers
        return up and self.answers()

    def answers(self):
        try:
            if not self.tls:
                return http_get(self.port, timeout=1.0)[0] == 200
            # The bench's own certificate: what is checked here is that it serves.
            connection = http.client.HTTPSConnection('127.0.0.1', self.port, timeout=1.0,
                                                     context=ssl._create_unverified_context())
            try:
                connection.request('GET', '/')
                return connection.getresponse().status == 200
            finally:
                connection.close()
        except (OSError, http.client.HTTPException):
            return False

    def cpu_seconds(self):
        """{pid: user + system CPU seconds} of the server's every live process
        (master, workers, helpers): the CPU a request costs is all of it."""
        times = {}
        for process in [psutil.Process(self.proc.pid)] + self.proc.children():
            try:
                cpu = process.cpu_times()
            except psutil.Error:
                continue  # exited meanwhile
            times[process.pid] = cpu.user + cpu.system
        return times

    def wait_ready(self, timeout=30):
        wait_until(self.ready, timeout, interval=0.05, message=f'{self.kind} to serve')
        return self

    def worker_pids(self):
        if self.kind == 'zkprefork':
            return sorted(self.proc.titled('zkprefork: worker'))
        if self.kind == 'waitress':
            return [self.proc.pid]
        return [child.pid for child in self.proc.children()]

    def stop(self, timeout=5.0):
        if self.proc:
            self.proc.stop(timeout=timeout)
