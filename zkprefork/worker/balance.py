"""Balanced accepting: which worker should take the next connection.

All workers poll the one listening socket and the kernel wakes them all;
whoever calls accept() first wins, so one worker used to take a whole
burst of new connections and a blocking application then ran on its
threads only. Each worker now asks, before it polls, whether another live
worker is a better home for the next connection, from what the scoreboard
says of every worker at that moment:

- a worker with a free thread beats one without (a new request there runs
  at once, instead of waiting for a thread);
- between workers alike in that, one holding fewer connections beats one
  holding `slack` more, so that keep-alive connections spread evenly (the
  slack grows with the connections held, so that thousands of connections
  never wait on exact equality).

A worker that defers does not watch the listening socket, and decides
again every DEFER_POLL_SECONDS; the worker it defers to watches it, and a
worker never defers to one whose loop has stopped turning. When every
worker is alike (all busy, say), nobody defers and connections are
accepted at once. This is a decision on state, not on timing: the first
attempt in bench/RESULTS.md, an accept throttle with no way back, left
connections waiting in the backlog, and a 2 ms wait-and-see depended on
the other worker being scheduled in time.
"""
from typing import NamedTuple

DEFER_POLL_SECONDS = 0.01


class Standing(NamedTuple):
    """What balancing reads of one worker."""
    free_threads: int
    connections: int


def slack(standings):
    """How many more connections than another a worker may hold (at least one)."""
    total = sum(connections for _, connections in standings)
    return 1 + total // (8 * len(standings))


def defer(mine, others):
    """Whether one of `others` (Standings, or (free threads, connections)
    pairs, of live, serving workers) is a better home for the next
    connection than `mine`."""
    if not others:
        return False
    free, connections = mine
    allowed = slack([mine, *others])
    for other_free, other_connections in others:
        if (other_free > 0) != (free > 0):
            if other_free > 0:
                return True
        elif other_connections + allowed <= connections:
            return True
    return False
