"""The master's signals, queued in the order they arrive.

A handler that only sets a flag would not wake select() (PEP 475 retries
it); signal.set_wakeup_fd writes to a pipe in the selector instead, so the
loop wakes at once and handles the queue in order, in its own code."""
import collections
import os
import selectors
import signal


class SignalQueue:
    """Catches `signums` while installed; `append` also queues one by hand
    (the monitor's reload, ttin and ttou commands)."""

    def __init__(self, signums):
        self.signums = tuple(signums)
        self._queue = collections.deque()
        self._fds = ()

    def install(self, selector):
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        self._fds = (read_end, write_end)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        selector.register(read_end, selectors.EVENT_READ, self._drain_wakeup)
        for signum in self.signums:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        # Runs between bytecodes in the master's (only) thread; the wake-up
        # fd has already made select() return.
        self._queue.append(signum)

    def append(self, signum):
        self._queue.append(signum)

    def _drain_wakeup(self):
        try:
            os.read(self._fds[0], 4096)
        except BlockingIOError:
            pass

    def pending(self):
        """Each queued signal number, oldest first, including any that arrive meanwhile."""
        while self._queue:
            yield self._queue.popleft()

    def fds(self):
        """The wake-up pipe: a forked child closes it."""
        return list(self._fds)

    def uninstall(self):
        signal.set_wakeup_fd(-1)
        for signum in self.signums:
            signal.signal(signum, signal.SIG_DFL)
        for fd in self._fds:
            os.close(fd)
        self._fds = ()
