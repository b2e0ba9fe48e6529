"""Prototypes of a faster zkprefork worker, within zope.server's extension
points (subclasses of the server, channel, task and dispatcher).  Bench-only:
bench/experiments/fastcli.py installs them in each worker after fork;
nothing in zkprefork/ is changed.

Variants (combine with '+', e.g. ``sq+direct``):

sq      the task dispatcher's queue.Queue (a Python-level Condition: a lock
        allocated per wait, notify() in Python) becomes a C queue.SimpleQueue.
direct  the pool thread that ran a request sends the response itself and
        hands the channel back to the loop without pulling the trigger pipe;
        the channel stays registered for reading while its task runs, so the
        next request on the connection wakes the loop by itself.  The trigger
        is pulled only when output is left over (a slow client, a large
        response) or the channel must close.
buf     a plain list-of-bytes output buffer instead of zope.server's
        SpooledTemporaryFile-based one (it still spills to that once more
        than outbuf_overflow bytes are pending), and the response header goes
        out in the same write as the first body chunk.
hdr     the Date header is formatted once per second, not per request.
bal     balance connections between workers: a worker that already holds a
        connection per thread lets a pending connection wait up to 2 ms
        before accepting it, so that a less loaded worker (woken by the same
        poll) takes it; if it is still pending after that, every worker is as
        loaded, and this one accepts freely for the next 100 ms.  (A first
        version counted busy threads instead of connections: requests arrive
        after the accept, so a burst could still all land on one worker.)  Without it one worker may take most of a
        burst of connections, and a blocking app then runs on its threads only.
swi     sys.setswitchinterval(0.001): a thread that wants the GIL waits at
        most 1 ms (default 5 ms) for a CPU-bound holder to drop it.
"""
import asyncore
import queue
import sys
import time
from collections import deque

from zope.server import dualmodechannel
from zope.server.buffers import OverflowableBuffer
from zope.server.http import httptask
from zope.server.serverchannelbase import task_lock
from zope.server.taskthreads import ThreadedTaskDispatcher

from zkprefork import zopeserver

VARIANTS = {
    'sq': 'task dispatcher on queue.SimpleQueue instead of queue.Queue',
    'direct': 'pool thread sends the response and hands the channel back without the trigger pipe; '
              'the channel stays readable while its task runs',
    'buf': 'list-of-bytes output buffer (spills to the spooled file past outbuf_overflow); '
           'header and first body chunk in one write',
    'hdr': 'Date header formatted once per second',
    'bal': 'a worker holding a connection per thread defers accept() by up to 2 ms (then accepts freely for 100 ms)',
    'swi': 'sys.setswitchinterval(0.001)',
    # variants that fastcli.py applies itself:
    'pre': 'zope.server imported in the master and gc.freeze() before each fork (shared copy-on-write)',
    'arena2': 'MALLOC_ARENA_MAX=2',
    'proposal': 'zkprefork.zopeserver replaced by bench/experiments/proposed_zopeserver.py, the exact code '
                'proposed (= sq + direct + buf + hdr + bal, and the crash fix), worker on its TaskDispatcher',
}
ALL = ("sq", "direct", "buf", "hdr")


def describe(name):
    if name == 'all':
        return 'all of ' + ', '.join(ALL)
    return VARIANTS[name]


# -- sq ------------------------------------------------------------------------

class SimpleQueueDispatcher(ThreadedTaskDispatcher):
    """ThreadedTaskDispatcher on a C SimpleQueue.  Everything it does with
    self.queue (put, get, empty, qsize) SimpleQueue has."""

    def __init__(self):
        super().__init__()
        self.queue = queue.SimpleQueue()


# -- bal -----------------------------------------------------------------------

class BalancedServerMixin:
    defer_accept_s = 0.002   # how long a worker with a connection per thread leaves a new one to the others
    backlog_free_s = 0.1     # a connection nobody took meanwhile: everyone is loaded, accept freely this long
    _deferred_since = None
    _free_until = 0.0

    def handle_accept(self):
        threads = len(getattr(self.task_dispatcher, 'threads', ())) or 1
        if len(zopeserver.DrainingChannel.active_channels) >= threads:
            now = time.monotonic()
            if now >= self._free_until:
                if self._deferred_since is None:
                    self._deferred_since = now
                    return
                if now - self._deferred_since < self.defer_accept_s:
                    return
                # Still pending after the grace: the other workers are loaded too.
                self._free_until = now + self.backlog_free_s
        self._deferred_since = None
        super().handle_accept()


# -- buf -----------------------------------------------------------------------

class ListBuffer:
    """The part of zope.server's buffer API that DualModeChannel uses
    (len, append, get, skip, close), on a deque of bytes.  Past `overflow`
    pending bytes it moves everything into an OverflowableBuffer (memory,
    then a temporary file), as zope.server's own buffer does."""

    def __init__(self, overflow):
        self.overflow = overflow
        self.chunks = deque()
        self.size = 0
        self.spilled = None

    def __len__(self):
        return self.spilled.__len__() if self.spilled is not None else self.size

    def __bool__(self):
        return bool(self.spilled) if self.spilled is not None else self.size > 0

    def append(self, data):
        if self.spilled is not None:
            self.spilled.append(data)
            return
        self.chunks.append(bytes(data))
        self.size += len(data)
        if self.size > self.overflow:
            self.spilled = OverflowableBuffer(self.overflow)
            for chunk in self.chunks:
                self.spilled.append(chunk)
            self.chunks.clear()
            self.size = 0

    def get(self, numbytes=-1, skip=False):
        if self.spilled is not None:
            return self.spilled.get(numbytes, skip)
        chunks = self.chunks
        if len(chunks) > 1 and (numbytes < 0 or len(chunks[0]) < numbytes):
            joined = b''.join(chunks)
            chunks.clear()
            chunks.append(joined)
        data = chunks[0] if chunks else b''
        if numbytes >= 0:
            data = data[:numbytes]
        if skip:
            self.skip(len(data))
        return data

    def skip(self, numbytes, allow_prune=0):
        if self.spilled is not None:
            return self.spilled.skip(numbytes, allow_prune)
        if numbytes > self.size:
            raise ValueError(f"Can't skip {numbytes} bytes in buffer of {self.size} bytes")
        self.size -= numbytes
        chunks = self.chunks
        while numbytes:
            first = chunks[0]
            if len(first) <= numbytes:
                chunks.popleft()
                numbytes -= len(first)
            else:
                chunks[0] = first[numbytes:]
                numbytes = 0

    def prune(self):
        if self.spilled is not None:
            self.spilled.prune()

    def getfile(self):
        if self.spilled is not None:
            return self.spilled.getfile()
        import io
        return io.BytesIO(b''.join(self.chunks))

    def close(self):
        if self.spilled is not None:
            self.spilled.close()
        self.chunks.clear()
        self.size = 0


class BufChannelMixin:
    def __init__(self, server, conn, addr, adj=None):
        super().__init__(server, conn, addr, adj)
        # DualModeChannel.__init__ made an OverflowableBuffer (a SpooledTemporaryFile): replace it.
        self.outbuf.close()
        self.outbuf = ListBuffer(self.adj.outbuf_overflow)


class BufTaskMixin:
    def write(self, data):
        channel = self.channel
        if not self.wrote_header:
            head = self.buildResponseHeader()
            self.wrote_header = 1
            self.bytes_written += channel.write(head + data if data else head)
        elif data:
            self.bytes_written += channel.write(data)


# -- hdr -----------------------------------------------------------------------

_date_cache = [0, '']


def cached_http_date(now):
    second = int(now)
    if _date_cache[0] != second:
        _date_cache[:] = [second, httptask.build_http_date(second)]
    return _date_cache[1]


class HdrTaskMixin:
    def prepareResponseHeaders(self):
        super().prepareResponseHeaders()
        if 'Date' in self.response_headers:
            self.response_headers['Date'] = cached_http_date(self.start_time)


# -- direct --------------------------------------------------------------------

class DirectChannelMixin:
    """See the module docstring ('direct')."""

    def readable(self):
        # In sync mode too: a pipelined request is parsed and queued (queue_task
        # appends to self.tasks under task_lock), an end of file is noticed.
        return not self.will_close

    def handle_read(self):
        if self.will_close:
            return
        try:
            data = self.recv(self.adj.recv_bytes)
        except OSError:
            self.handle_comm_error()
            return
        self.last_activity = time.time()
        if data:
            self.received(data)

    def handle_close(self):
        if self.async_mode:
            self.close()
        else:
            # A pool thread owns the channel: close once it hands it back
            # (service() sees will_close and wakes the loop).
            self.will_close = True

    def service(self):
        """ServerChannelBase.service, plus: send from this thread after each task."""
        while True:
            with task_lock:
                if self.tasks:
                    task = self.tasks.pop(0)
                else:
                    self.running_tasks = False
                    self._hand_back()
                    return
            try:
                task.service()
            except:  # noqa: E722 as zope.server does: keep the channel serviced
                self.server.addTask(self)
                raise
            if not self.async_mode:
                try:
                    while self._flush_some():
                        pass
                except OSError:
                    self.will_close = True  # the loop closes it once handed back

    def _hand_back(self):
        self.async_mode = True
        self.last_activity = time.time()
        if self.outbuf or self.will_close:
            # The loop is needed: it may not be polling this fd for writing.
            self.pull_trigger()


# -- assembly --------------------------------------------------------------------

def classes(names):
    """(server class, dispatcher class) for a set of variant names."""
    if 'all' in names:
        names = (set(names) - {'all'}) | set(ALL)
    unknown = names - set(VARIANTS) - {'pre', 'arena2', 'proposal'}
    if unknown:
        raise SystemExit(f'fastserver: unknown variant(s) {", ".join(sorted(unknown))}')
    task_bases = []
    channel_bases = []
    if 'buf' in names:
        task_bases.append(BufTaskMixin)
        channel_bases.append(BufChannelMixin)
    if 'hdr' in names:
        task_bases.append(HdrTaskMixin)
    if 'direct' in names:
        channel_bases.append(DirectChannelMixin)
    task_class = type('FastTask', (*task_bases, zopeserver.DrainingTask), {})
    channel_class = type('FastChannel', (*channel_bases, zopeserver.DrainingChannel),
                         {'task_class': task_class})
    server_bases = (BalancedServerMixin,) if 'bal' in names else ()
    server_class = type('FastServer', (*server_bases, zopeserver.SharedSocketServer),
                        {'channel_class': channel_class})
    dispatcher_class = SimpleQueueDispatcher if 'sq' in names else ThreadedTaskDispatcher
    if 'swi' in names:
        sys.setswitchinterval(0.001)
    return server_class, dispatcher_class


def install(names):
    """Make zkprefork's worker use the prototypes (call in the worker, after fork)."""
    import zope.server.taskthreads
    server_class, dispatcher_class = classes(set(names))
    zopeserver.SharedSocketServer = server_class
    zope.server.taskthreads.ThreadedTaskDispatcher = dispatcher_class
    # fresh_wakeup() replaces dualmodechannel.the_trigger; pull_trigger reads it at call time.
    assert dualmodechannel.DualModeChannel.pull_trigger
    assert asyncore.socket_map is not None
