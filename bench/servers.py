"""The servers under test: how each is started, known to be ready, and
which of its processes are workers.

Every server serves bench/apps.py's `app` with WORKERS processes × THREADS
threads (waitress, a single process, gets all the threads), on 127.0.0.1
and a free port, as a zkprefork.testing.ProcessUnderTest: in a session of
its own, its output in a log file, stopped by pid and process group.

    KINDS        every server kind, in the order of the tables
    Server       one running server of a kind
"""
import http.client
import os
import sys
import sysconfig

from zkprefork.testing import ProcessUnderTest, free_port, http_get, wait_until

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
SCRIPTS = sysconfig.get_path('scripts')  # console scripts of this interpreter's packages (the bench extra)

WORKERS, THREADS = 2, 4


def child_env():
    """Variables for a server: bench/ (apps.py) and this checkout (zkprefork) first on the path."""
    return {'PYTHONPATH': os.pathsep.join(filter(None, [BENCH, REPO, os.environ.get('PYTHONPATH')])),
            'PYTHONUNBUFFERED': '1'}


def write_ini(directory, port, workers=WORKERS, threads=THREADS, extra=''):
    path = os.path.join(directory, f'zkprefork-{port}.ini')
    with open(path, 'w') as file:
        file.write('[app:main]\nuse = call:apps:make_app\n\n'
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


class Server:
    """A server of one of KINDS under test: start() it through `processes`
    (a zkprefork.testing.Processes), wait_ready(), then stop()."""

    def __init__(self, kind, processes, workdir, port=None, workers=WORKERS, threads=THREADS, ini_extra=''):
        if kind not in KINDS:
            raise ValueError(f'unknown server {kind!r}: one of {", ".join(KINDS)}')
        self.kind = kind
        self.processes = processes
        self.port = port or free_port()
        self.workers = workers
        self.threads = threads
        self.workdir = workdir
        self.ini_extra = ini_extra
        self.proc = None

    def argv(self):
        py, bind = sys.executable, f'127.0.0.1:{self.port}'
        workers, threads = str(self.workers), str(self.threads)
        if self.kind == 'zkprefork':
            return [py, '-m', 'zkprefork.cli',
                    write_ini(self.workdir, self.port, self.workers, self.threads, self.ini_extra)]
        if self.kind == 'gunicorn-gthread':
            return [py, '-m', 'gunicorn', '-w', workers, '-k', 'gthread', '--threads', threads, '-b', bind,
                    'apps:app']
        if self.kind == 'gunicorn-sync':
            return [py, '-m', 'gunicorn', '-w', workers, '-k', 'sync', '-b', bind, 'apps:app']
        if self.kind == 'waitress':
            # Single process, so all the threads in one; its default connection
            # limit (100) and select() would refuse the 1000-connection load.
            return [py, '-m', 'waitress', f'--threads={self.workers * self.threads}', f'--listen={bind}',
                    '--connection-limit=2000', '--asyncore-use-poll', 'apps:app']
        if self.kind == 'uwsgi':
            # http11-socket keeps connections alive (plain --http-socket does not).
            return [os.path.join(SCRIPTS, 'uwsgi'), '--http11-socket', bind, '--master', '--processes', workers,
                    '--threads', threads, '--module', 'apps:app', '--disable-logging', '--thunder-lock',
                    '--listen', '1024']
        return [py, '-m', 'granian', '--interface', 'wsgi', '--host', '127.0.0.1', '--port', str(self.port),
                '--workers', workers, '--blocking-threads', threads, 'apps:app']

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
            return http_get(self.port, timeout=1.0)[0] == 200
        except (OSError, http.client.HTTPException):
            return False

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
