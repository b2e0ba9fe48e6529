"""What supervising child processes takes (the master's workers and its
registrar): restart back-off, so that something failing at start never
becomes a fork loop, and how an exit reads in the log."""
import os
import signal

NEVER = float('inf')

# Signals the master alone acts on. Children ignore them, so that one sent to
# the whole process group (Ctrl-C, `pkill -HUP zkprefork`) reaches them as
# nothing: Ctrl-C must not close the session before the master has deleted
# the node, nor HUP kill a worker while it loads the application, nor TTIN
# freeze anything.
MASTER_ONLY_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


def describe_exit(status):
    """A wait status as 'exit status N' or 'killed by SIGNAME'."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f'killed by {signal.Signals(-code).name}'
    return f'exit status {code}'


def reaped():
    """(pid, wait status) of each child that has exited, without waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def send_signal(pid, signum):
    """Signal a child that may have exited (and not yet been reaped) meanwhile."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class Backoff:
    """Failures in a row and when the next start may happen.

    Delays grow from `first` seconds, doubling up to `limit`; a success
    (`reset`) starts the series again. Times are monotonic seconds, passed
    in by the caller."""

    def __init__(self, first=0.5, limit=30.0):
        self.first = first
        self.limit = limit
        self.failures = 0
        self.not_before = None  # a start is held back until then

    def failed(self, now, limit=None):
        """Count one more failure; return the delay (seconds) before the
        next start, at most `limit` if given (else the back-off's own)."""
        self.failures += 1
        delay = min(self.limit if limit is None else limit, self.first * 2 ** (self.failures - 1))
        self.not_before = now + delay
        return delay

    def reset(self):
        self.failures = 0

    def take(self, now):
        """True if a start may happen now; the hold, if any, is used up."""
        if self.not_before is not None and self.not_before > now:
            return False
        self.not_before = None
        return True

    def cancel(self):
        self.not_before = None

    def deadline(self, now):
        """When a held-back start becomes due; NEVER if none is still ahead.

        A hold already past needs no wake-up: whoever acts on it runs on
        every turn of the loop anyway."""
        if self.not_before is None or self.not_before <= now:
            return NEVER
        return self.not_before
