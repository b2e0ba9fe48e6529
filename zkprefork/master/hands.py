"""The master's hands: they carry out the pool's decisions (pool.py) with
fork and signals, and bring each worker's messages and exit back to it."""
import selectors
import signal
import time

from zkprefork.master import spawn
from zkprefork.master.pool import BootFailedAtStart, Kill, Retire, Spawn
from zkprefork.supervision import describe_exit, reaped, send_signal
from zkprefork.worker.process import Worker


def forget(selector, fileobj):
    try:
        selector.unregister(fileobj)
    except (KeyError, ValueError):
        pass  # already forgotten at end of file


class Hands:
    """For one master (loop.Master): its pool, scoreboards, selector and
    the fds a worker must not keep; `handled_signals` reset in each worker."""

    def __init__(self, master, handled_signals):
        self.master = master
        self.handled_signals = handled_signals

    def perform(self, actions):
        """Carry out the pool's actions (Spawn, Retire, Kill, BootFailedAtStart)."""
        master = self.master
        for action in actions:
            match action:
                case Spawn(slot):
                    self._spawn(slot)
                case Retire(pid):
                    send_signal(pid, signal.SIGTERM)
                case Kill(pid):
                    send_signal(pid, signal.SIGKILL)
                case BootFailedAtStart():
                    master.exit_status = 1
                    master.stop_signal = master.stop_signal or signal.SIGTERM

    def _spawn(self, slot):
        master = self.master
        record = master.scoreboards.claim(master.pool.count, master.settings.threads)

        def serve(link):
            # Old boards still in use by draining workers would otherwise
            # stay mapped in this worker for its whole life.
            master.scoreboards.keep_only(record.board)
            Worker(slot, master.settings, master.listener, link, record, master.app, master.tls_context).run()
        masters_fds = (master.signals.fds() + [w.link.fileno() for w in master.pool.workers.values()]
                       + master.link.child_fds() + master.monitor.fds() + master.upgrades.fds())
        pid, link = spawn.fork_worker(serve, master.selector, masters_fds, self.handled_signals)
        master.pool.started(slot, pid, time.monotonic(), link).record = record
        master.selector.register(link.sock, selectors.EVENT_READ, lambda: self._on_worker_link(pid, link))

    def _on_worker_link(self, pid, link):
        messages = link.messages()
        if messages is None:
            forget(self.master.selector, link.sock)
        else:
            self.master.pool.heard(pid, messages, time.monotonic())

    def reap(self, now):
        """Every exited child: a worker goes back to the pool; any other
        is the new master of an upgrade, or the registrar."""
        master = self.master
        for pid, wait_status in reaped():
            worker = master.pool.workers.get(pid)
            if worker is None:
                master.upgrades.reap(pid, wait_status) or master.link.reap(pid, wait_status, now)
                continue
            self._on_worker_link(pid, worker.link)  # what it said last
            forget(master.selector, worker.link.sock)
            worker.link.close()
            master.scoreboards.release(worker.record)
            self.perform(master.pool.exited(pid, describe_exit(wait_status), now))
