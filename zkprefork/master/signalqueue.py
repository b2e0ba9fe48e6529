"""The master's signals, queued in the order they arrive.

A handler that only sets a flag would not wake select() (PEP 475 retries
it); signal.set_wakeup_fd writes to a pipe in the selector instead, so the
loop wakes at once and handles the queue in order, in its own code.

The signals are blocked at the command's first line (hold) and the queue
installed first thing in launch.start, before the settings are read or a
preloaded application loads, so that no signal meets the default action
(HUP and USR1 would kill the master). Until
the loop watches the queue, a stop signal cannot wait for it (a load may
take minutes): it raises StopBeforeServing where the master is, and launch
returns 0. Other signals wait in the queue for the loop, which handles them
as it would later."""
import collections
import contextlib
import os
import selectors
import signal

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                   signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def hold(signums=HANDLED_SIGNALS):
    """Block `signums` (pthread_sigmask) until SignalQueue.install: one that
    arrives meanwhile waits, pending, for the handler instead of meeting its
    default action (HUP, USR1, USR2 and TERM would kill the master). The
    zkprefork command calls it at its first line; the mask is inherited
    through fork and exec (see held)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)


@contextlib.contextmanager
def held(signums=HANDLED_SIGNALS):
    """`signums` blocked in the block, for a child started in it (a live
    upgrade's new master) to begin with them blocked: from its first
    instruction, not only from its own call of hold()."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class StopBeforeServing(BaseException):
    """A stop signal arrived before the loop ran. A BaseException, like
    KeyboardInterrupt, so that an application's `except Exception` around
    its loading does not swallow it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class SignalQueue:
    """Catches `signums` while installed; `append` also queues one by hand
    (the monitor's reload, ttin and ttou commands). Those of `stops` raise
    StopBeforeServing until `watch()`."""

    def __init__(self, signums, stops=()):
        self.signums = tuple(signums)
        self.stops = frozenset(stops)
        self._queue = collections.deque()
        self._fds = ()
        self._watched = False

    def install(self):
        """Take the signals over: call first, before anything slow."""
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        self._fds = (read_end, write_end)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in self.signums:
            signal.signal(signum, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signums)  # those held (hold) arrive now

    def watch(self, selector):
        """The loop runs from now on: every signal waits in the queue, and
        `selector` wakes for each (at once for any queued meanwhile)."""
        selector.register(self._fds[0], selectors.EVENT_READ, self._drain_wakeup)
        self._watched = True

    def _on_signal(self, signum, frame):
        # Runs between bytecodes in the master's (only) thread; the wake-up
        # fd has already made select() return.
        if signum in self.stops and not self._watched:
            raise StopBeforeServing(signum)
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
        """Back to the default actions; the pipe is closed."""
        signal.set_wakeup_fd(-1)
        for signum in self.signums:
            signal.signal(signum, signal.SIG_DFL)
        for fd in self._fds:
            os.close(fd)
        self._fds = ()
