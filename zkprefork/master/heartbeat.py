"""Whether the registrar's loop still answers: the master pings it on its
stdin (protocol.Ping) and its loop answers (Pong). A registrar that
stopped (SIGSTOP) or deadlocked says nothing more, while ZooKeeper expires
its session: the master must not go on reporting what it said last.

Two bounds, from the ping that went unanswered, tied to the session
timeout T (seconds):

- past STALE (T/2, at least 1 s) the registration is reported 'unknown',
  with no node: pings go every T/4, so this is said within 3T/4, before
  ZooKeeper (which expires a silent session after T) may have dropped a node;
- past KILL the master SIGKILLs the registrar and restarts it as one that
  died. A registrar waiting on ZooKeeper keeps answering, except while its
  loop waits for one request, at most session.op_timeout (max(T, 2 s)):
  KILL is twice T, and at least that plus 3 s.

A stop is another matter: the master keeps accepting until the registrar
confirms the node's deletion, for at most 5 s, and a frozen registrar
never will. Once a stop waits on it (`hurry`), a ping goes at once and
KILL shrinks to STOP_KILL: a successor resumes the session and deletes the
node in the seconds left, instead of the node outliving the port until
ZooKeeper expires the frozen one's session.

A fresh interpreter importing kazoo on a loaded machine may take seconds
before its loop runs: the first ping of each registrar gets START_GRACE more.
"""
from zkprefork.registrar.protocol import Ping
from zkprefork.supervision import NEVER

START_GRACE = 10.0  # seconds
MIN_STALE = 1.0  # seconds: a loop's ordinary hiccups on a loaded machine
KILL_MARGIN = 3.0  # seconds beyond the longest wait for one ZooKeeper request
STOP_KILL = 1.5  # seconds a registrar may be silent while a stop waits on it


class Heartbeat:
    """Pings for one registrar after another; `session_timeout` in seconds,
    times monotonic seconds. One ping at a time is unanswered at most."""

    def __init__(self, session_timeout):
        self.every = session_timeout / 4
        self.stale_after = max(session_timeout / 2, MIN_STALE)
        self.kill_after = max(2 * session_timeout, max(session_timeout, 2.0) + KILL_MARGIN)
        self.seq = 0
        self.sent = None  # when the unanswered ping went, or None
        self.next_ping = NEVER
        self.grace = 0.0

    def started(self, now):
        """A new registrar: ping it now, with START_GRACE for its answer."""
        self.sent, self.next_ping, self.grace = None, now, START_GRACE

    def hurry(self, now):
        """A stop waits on the registrar: ping it now (unless a ping is
        out already) and kill it after STOP_KILL of silence."""
        self.kill_after = min(self.kill_after, STOP_KILL)
        if self.sent is None:
            self.next_ping = min(self.next_ping, now)

    def stopped(self):
        """No registrar to ping (exited, or killed)."""
        self.sent, self.next_ping = None, NEVER

    def ping(self, now):
        """The Ping to send now, or None."""
        if self.sent is not None or now < self.next_ping:
            return None
        self.seq += 1
        self.sent = now
        return Ping(self.seq)

    def answered(self, seq, now):
        if seq == self.seq and self.sent is not None:
            self.sent, self.grace, self.next_ping = None, 0.0, now + self.every

    def silent_for(self, now):
        """Seconds the loop has been silent beyond what is allowed it (grace)."""
        return 0.0 if self.sent is None else max(0.0, now - self.sent - self.grace)

    def stale(self, now):
        return self.silent_for(now) >= self.stale_after

    def dead(self, now):
        return self.silent_for(now) >= self.kill_after

    def deadline(self, now):
        """When to look again: the next ping, or the next bound still ahead
        of the unanswered one (NEVER once both are past: it is being killed)."""
        if self.sent is None:
            return self.next_ping
        start = self.sent + self.grace
        return min((t for t in (start + self.stale_after, start + self.kill_after) if t > now),
                   default=NEVER)

    def silence(self, now):
        """One line: how long the unanswered ping has waited."""
        return f'has not answered for {now - self.sent:.1f} s' if self.sent is not None else 'answers'
