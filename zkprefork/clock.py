"""The one clock zkprefork measures durations on.

Timeouts, deadlines and idle times are differences of `now()`
(time.monotonic). The wall clock steps when NTP corrects it or a VM
resumes, and a duration measured across a step is off by the whole step:
stepped back an hour, an idle keep-alive connection was never closed and a
stop waited its whole graceful_timeout; stepped forward, connections in use
were closed as idle. time.time() is for timestamps only (log lines, the
Date field, a node's registration time).
"""
import time

now = time.monotonic


def as_wall_clock(instant):
    """`instant` (a `now()` reading) as a time.time() reading, on the wall
    clock as it reads at this call: for code that compares it with
    time.time() (zope.server's), so that a step between the two readings
    counts for nothing."""
    return time.time() - (now() - instant)
