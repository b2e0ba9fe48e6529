"""The scoreboard: shared memory in which every worker tells what it is
doing, and that every process reads.

The master allocates it (an anonymous shared mmap) before it forks, so
that every worker inherits the same pages. It holds one record per worker
process (a slot's old and new worker during a reload each have one):

    pid, state, threads         written by the worker's main thread
    loop_beat                   written by the worker's asyncore loop
    connections, busy, waiting  written by any of its threads, one at a time
                                (under the worker's lock)
    per thread: ident, started (0 = idle), request line, and the
                histogram of its finished requests (count per bucket, sum)
                                written by that thread only
    stopping, used (per board)  written by the master only

Lock-free: every field has a single writer, and values are plain stores
of 8-byte aligned numbers, so a reader sees each field whole (a request
line may be torn, which only shows in the monitor). A thread clears
`started` before it files its duration, so a reader never counts a request
twice. A worker's request count is the sum of its threads' histograms.

Capacity: a board is sized when it is made, for `records` workers of
`threads` threads; the master makes the first one at start for twice the
`workers` option (room for a reload's replacements) or MIN_RECORDS,
whichever is more, and a new one only when a worker to be forked does not
fit (SIGTTIN beyond that, or a reload that raises `threads`). Workers only
see the board they were forked with, so balancing spans the workers of one
board; a board goes when its last worker is reaped. Pages are committed as
records are first written: records are claimed lowest first, and readers
look only below the highest claimed one.

Unmapping: a board that goes is closed (munmap) at once, not left to the
garbage collector: its records and the board refer to each other, and the
master freezes the collector before every fork (spawn.py), which makes
such a cycle immortal. A new worker closes, in its own process, every
board but its own, so that it carries no old board for its whole life.
"""
import bisect
import ctypes
import logging
import mmap
import threading
import time

from zkprefork.tls import HANDSHAKE_FAILURES
from zkprefork.worker import balance

log = logging.getLogger('zkprefork.scoreboard')

# Request duration histogram buckets, seconds (Prometheus's defaults, and
# longer ones for slow applications); the last bucket is +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
REQUEST_BYTES = 120  # of the request line kept per busy thread
LIVE_SECONDS = 2.0  # a worker whose loop has not turned for this long may be stuck
MIN_RECORDS = 64

# A worker's state in its record (Header.state), written by the worker:
# its record is free, it loads the application, it serves, it has asked to
# be replaced (it leaves new connections to the others), it drains.
EMPTY, STARTING, SERVING, WORN, RETIRING = range(5)


class ThreadEntry(ctypes.Structure):
    _fields_ = [('ident', ctypes.c_uint64),
                ('started', ctypes.c_double),  # time.monotonic() of the running request; 0 = idle
                ('request', ctypes.c_char * REQUEST_BYTES),
                ('duration_sum', ctypes.c_double),  # seconds
                ('buckets', ctypes.c_uint64 * (len(BUCKETS) + 1))]


class Header(ctypes.Structure):
    _fields_ = [('pid', ctypes.c_int64),
                ('state', ctypes.c_int32),
                ('threads', ctypes.c_int32),
                ('connections', ctypes.c_int64),
                ('loop_beat', ctypes.c_double),  # time.monotonic() of the loop's last turn
                ('busy', ctypes.c_int64),  # threads running a request
                ('waiting', ctypes.c_int64),  # connections accepted, their first request not started
                ('handshakes', ctypes.c_int64),  # TLS handshakes completed (by the loop's thread)
                ('handshake_failures', ctypes.c_int64 * len(HANDSHAKE_FAILURES))]  # by reason


class BoardHeader(ctypes.Structure):
    _fields_ = [('stopping', ctypes.c_int64),  # the whole server stops: no worker stays
                ('used', ctypes.c_int64)]  # records below this index may be in use


def _record_type(threads):
    return type(f'Record{threads}', (ctypes.Structure,),
                {'_fields_': [('head', Header), ('thread', ThreadEntry * threads)]})


class Record:
    """One worker's record, for its worker (writing) and anyone (reading)."""

    def __init__(self, board, index, data):
        self.board = board
        self.index = index
        self._data = data
        self.head = data.head
        self.threads = data.thread

    # -- reading -------------------------------------------------------

    @property
    def state(self):
        return self.head.state

    def standing(self):
        """What balancing reads, (free threads, connections) as in
        balance.Standing: a connection accepted whose first request has not
        started counts as a thread taken, as it soon will be."""
        head = self.head
        return head.threads - head.busy - head.waiting, head.connections

    def busy(self):
        """[(thread number, started, request line, thread ident)] of the
        threads running a request (started: time.monotonic() seconds)."""
        running = []
        for number, entry in enumerate(self.threads):
            started = entry.started
            if started:
                running.append((number, started, entry.request.decode('latin-1'), entry.ident))
        return running

    def histogram(self):
        """(counts per bucket, the last one +Inf; sum of durations in seconds)."""
        counts = [0] * (len(BUCKETS) + 1)
        total = 0.0
        for entry in self.threads:
            for i, count in enumerate(entry.buckets):
                counts[i] += count
            total += entry.duration_sum
        return counts, total

    def requests(self):
        """Finished requests."""
        return sum(self.histogram()[0])

    def handshakes(self):
        """TLS handshakes: [completed, then failed for each of tls.HANDSHAKE_FAILURES]."""
        return [self.head.handshakes, *self.head.handshake_failures]

    def clear(self):
        ctypes.memset(ctypes.addressof(self._data), 0, ctypes.sizeof(self._data))

    def _detach(self):
        """Drop the views into the board's memory, which pin its mapping; a
        use afterwards raises instead of touching unmapped memory."""
        self._data = self.head = self.threads = None


class Scorekeeper:
    """A worker's writer of its own record, and its balancing; zopeserver
    calls its hooks (requests from pool threads, channels and accepting
    from the asyncore loop).

    `on_request(count)` is called in the thread starting each request with
    the number of requests started so far."""

    def __init__(self, record, on_request=None):
        self.record = record
        self.on_request = on_request
        self.accepting = True
        self._local = threading.local()
        self._lock = threading.Lock()  # one writer at a time of busy, waiting, connections
        self._next_entry = 0
        self._started = 0
        self._busy = 0
        self._waiting = set()  # channels accepted whose first request has not started
        self._connections = set()
        self._others_used, self._others = 0, []  # the board's other records

    @property
    def requests(self):
        """Requests started so far in this worker."""
        return self._started

    def starting(self, pid, threads):
        self.record.head.pid = pid
        self.record.head.threads = min(threads, len(self.record.threads))
        self.record.head.state = STARTING

    def set_state(self, state):
        self.record.head.state = state

    def loop_turned(self):
        self.record.head.loop_beat = time.monotonic()

    # -- accepting (the loop, before each poll) ----------------------------

    def decide_accepting(self):
        """Whether the loop watches the listening socket this turn (see
        balance.py); a worn-out worker leaves new connections to any
        live worker that serves. Runs at every turn of the loop: kept lean."""
        board = self.record.board
        if self._others_used != board.header.used:  # the master claimed a record
            self._others_used = board.header.used
            self._others = [r for r in board.records[:self._others_used] if r is not self.record]
        live_since = time.monotonic() - LIVE_SECONDS
        others = []
        for record in self._others:
            head = record.head
            if head.state == SERVING and head.loop_beat > live_since:
                others.append(record.standing())
        if self.record.head.state == WORN:
            self.accepting = not others
        else:
            self.accepting = not balance.defer(self.record.standing(), others)
        return self.accepting

    def may_accept(self):
        return self.accepting

    # -- hooks -------------------------------------------------------------

    def handshake_completed(self):
        self.record.head.handshakes += 1

    def handshake_failed(self, reason):
        self.record.head.handshake_failures[HANDSHAKE_FAILURES.index(reason)] += 1

    def channel_opened(self, channel):
        self._count_channel(set.add, channel)

    def channel_closed(self, channel):
        self._count_channel(set.discard, channel)

    def _count_channel(self, change, channel):
        with self._lock:
            change(self._connections, channel)
            change(self._waiting, channel)
            self.record.head.connections = len(self._connections)
            self.record.head.waiting = len(self._waiting)

    def request_started(self, channel, request_line):
        entry = self._entry()
        if entry is not None:
            entry.request = request_line.encode('latin-1', 'replace')[:REQUEST_BYTES]
            entry.started = time.monotonic()
        with self._lock:
            self._started += 1
            self._busy += 1
            self.record.head.busy = self._busy
            if channel in self._waiting:
                self._waiting.discard(channel)
                self.record.head.waiting = len(self._waiting)
            count = self._started
        if self.on_request:
            self.on_request(count)

    def response_complete(self):
        """The thread's response is complete (its last bytes about to go):
        balancing counts the thread free from now on."""
        with self._lock:
            self._busy -= 1
            self.record.head.busy = self._busy

    def request_finished(self):
        """After response_complete(): files the request's duration."""
        entry = self._entry()
        if entry is None:
            return
        started = entry.started
        if started:
            duration = time.monotonic() - started
            entry.started = 0.0
            self._local.buckets[bisect.bisect_left(BUCKETS, duration)] += 1
            entry.duration_sum += duration

    def _entry(self):
        """This thread's entry (None beyond the board's capacity)."""
        try:
            return self._local.entry
        except AttributeError:
            with self._lock:
                number = self._next_entry
                self._next_entry += 1
            entry = self.record.threads[number] if number < len(self.record.threads) else None
            if entry is not None:
                entry.ident = threading.get_ident()
                self._local.buckets = entry.buckets  # ctypes makes a new view at each access
            self._local.entry = entry
            return entry


class Scoreboard:
    """`records` records of `threads` thread entries each, in one anonymous
    shared mmap. Made by the master, before it forks."""

    def __init__(self, records, threads):
        self.threads = threads
        record_type = _record_type(threads)
        size = ctypes.sizeof(BoardHeader) + records * ctypes.sizeof(record_type)
        self._map = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS
        self.header = BoardHeader.from_buffer(self._map)
        self.records = [
            Record(self, index, record_type.from_buffer(
                self._map, ctypes.sizeof(BoardHeader) + index * ctypes.sizeof(record_type)))
            for index in range(records)]
        self._free = set(range(records))  # the master's bookkeeping

    def claim(self):
        """A cleared record (the lowest free) for a worker about to be forked, or None if full."""
        if not self._free:
            return None
        record = self.records[min(self._free)]
        self._free.discard(record.index)
        record.clear()
        self.header.used = max(self.header.used, record.index + 1)
        return record

    def release(self, record):
        """Its worker was reaped: the record is free again."""
        record.clear()
        self._free.add(record.index)

    def in_use(self):
        return len(self._free) < len(self.records)

    def close(self):
        """Unmap the board. Every view into it goes first: mmap refuses to
        close while one exists (BufferError), which then leaves it mapped."""
        for record in self.records:
            record._detach()
        self.records, self.header, self._free = [], None, set()
        try:
            self._map.close()
        except BufferError:
            log.warning('a scoreboard of %d bytes is still referenced: left mapped', len(self._map))


class Scoreboards:
    """The master's boards: claims a record for each worker it forks, and
    keeps the request counts and durations of the workers it reaped."""

    def __init__(self, workers, threads):
        self.boards = [Scoreboard(max(2 * workers, MIN_RECORDS), threads)]
        self.retired_buckets = [0] * (len(BUCKETS) + 1)
        self.retired_sum = 0.0
        self.retired_handshakes = [0] * (1 + len(HANDSHAKE_FAILURES))

    def claim(self, workers, threads):
        """A record for a worker of `threads` threads, in a pool of `workers`."""
        board = self.boards[-1]
        record = board.claim() if board.threads >= threads else None
        if record is None:
            board = Scoreboard(max(2 * workers, MIN_RECORDS), threads)
            self.boards.append(board)
            record = board.claim()
            self._close_unused()  # the newest before it may have been empty
        return record

    def release(self, record):
        """Its worker was reaped: keep its figures, free the record, and close
        a board that no worker uses any more (unless it is the newest)."""
        counts, total = record.histogram()
        self.retired_buckets = [a + b for a, b in zip(self.retired_buckets, counts)]
        self.retired_sum += total
        self.retired_handshakes = [a + b for a, b in zip(self.retired_handshakes, record.handshakes())]
        record.board.release(record)
        self._close_unused()

    def _close_unused(self):
        """A board with a worker stays mapped until that worker is reaped,
        however long it drains: the monitor reads its record until then."""
        newest = self.boards[-1]
        for board in self.boards:
            if board is not newest and not board.in_use():
                board.close()
        self.boards = [b for b in self.boards if b is newest or b.records]

    def keep_only(self, board):
        """In a new worker: unmap the boards it was not forked for (its own
        process's copies; the master's stay)."""
        for other in self.boards:
            if other is not board:
                other.close()
        self.boards = [board]

    def stopping(self):
        """The server stops: draining workers need not wait for stragglers."""
        for board in self.boards:
            board.header.stopping = 1
