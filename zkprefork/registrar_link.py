"""The master's end of the registrar process (see registrar.py).

The master never imports kazoo: it starts the registrar as a fresh
interpreter and talks JSON lines to it over two pipes.
"""
import logging
import os
import signal
import subprocess
import sys

import zkprefork
from zkprefork.registrar_protocol import RegistrarConfig, Register, Unregister, read_event

log = logging.getLogger('zkprefork.master')


def _ignore_group_signals():
    """In the child, before exec (ignored signals stay ignored through exec):
    from its first instruction on, the registrar survives a signal sent to
    the whole process group. Ctrl-C must not close the session before the
    master has deleted the node, `pkill -HUP zkprefork` must not kill it, nor
    TTIN freeze it; USR1 stays ignored until it can reopen its logs."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class RegistrarLink:

    def __init__(self, settings):
        self.settings = settings
        self.process = None
        self.registered = False  # a register command was sent and not undone
        self._buffer = b''

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def start(self):
        package_parent = os.path.dirname(os.path.dirname(zkprefork.__file__))
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [package_parent, env.get('PYTHONPATH')]))
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'zkprefork.registrar'],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            preexec_fn=_ignore_group_signals)
        os.set_blocking(self.process.stdout.fileno(), False)
        self._send(self._config().line())
        self._buffer = b''

    def _config(self):
        """The registrar's first line. Secrets travel as a file path or an
        environment variable's name: the registrar reads them itself."""
        return RegistrarConfig.from_settings(self.settings)

    def fileno(self):
        return self.process.stdout.fileno()

    def _send(self, line):
        try:
            self.process.stdin.write(line.encode())
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.error('the registrar (pid %d) is gone; it will be restarted', self.process.pid)

    def register(self, endpoints, data):
        """Register every (host, port) endpoint, in the configured node format."""
        self.registered = True
        self._send(Register(endpoints, data).line())

    def unregister(self):
        self.registered = False
        self._send(Unregister().line())

    def close(self):
        """End of file for the registrar: it closes the session and exits."""
        if self.process and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass

    def events(self):
        """The events the registrar has written since the last call; None at
        end of file (the registrar exited)."""
        try:
            chunk = os.read(self.fileno(), 65536)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        lines = (self._buffer + chunk).split(b'\n')
        self._buffer = lines.pop()
        return [read_event(line) for line in lines if line.strip()]

    def exited(self, status):
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.process.stdout.close()
        self.close()

    def child_fds(self):
        """The fds a forked worker must close so that only the master holds
        the registrar's pipes (its end of file must mean the master died)."""
        if not self.process:
            return []
        return [f.fileno() for f in (self.process.stdin, self.process.stdout) if not f.closed]
