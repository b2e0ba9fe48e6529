"""zope.server, adapted to serve a socket bound by another process.

Import this module only in a worker, after fork: zope.server creates a
module-global wake-up pipe at import, and workers sharing one would steal
each other's wake-ups (requests stall until the poll timeout).
`fresh_wakeup()` replaces it all the same, for when the application
imported zope.server before fork (preload).
"""
import asyncore
import collections
import io
import itertools
import logging
import queue
import resource
import socket
import time

from zope.server import dualmodechannel, trigger
from zope.server.adjustments import Adjustments
from zope.server.buffers import OverflowableBuffer
from zope.server.http.http_date import build_http_date
from zope.server.http.httpserverchannel import HTTPServerChannel
from zope.server.http.httptask import HTTPTask
from zope.server.http.wsgihttpserver import WSGIHTTPServer
from zope.server.serverchannelbase import task_lock
from zope.server.taskthreads import ThreadedTaskDispatcher

ACCEPT_DEFER_SECONDS = 0.002  # how long a worker with a connection per thread leaves a new one to the others
BACKLOG_FREE_SECONDS = 0.1  # then, if nobody took it, how long it accepts without deferring


def fresh_wakeup():
    """Give this process its own trigger pipe and an empty socket map."""
    inherited = dualmodechannel.the_trigger
    asyncore.socket_map.clear()
    inherited.close()
    dualmodechannel.the_trigger = trigger.trigger()


def adjustments():
    adj = Adjustments()
    # The default limit (~97) counts idle keep-alive channels and would leave
    # clients waiting in the backlog; the real bound is the fd limit (poll()
    # is used, so fds above 1024 are fine).
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    adj.connection_limit = max(100, soft - 64)
    return adj


class TaskDispatcher(ThreadedTaskDispatcher):
    """zope.server's pool on a C queue.SimpleQueue: its queue.Queue is a
    Python Condition (a lock allocated per get(), notify() in Python)."""

    def __init__(self):
        super().__init__()
        self.queue = queue.SimpleQueue()


class OutputBuffer:
    """What DualModeChannel uses of zope.server's output buffer (len, append,
    get, skip, close) on a deque of bytes, instead of a SpooledTemporaryFile
    per connection; past `overflow` pending bytes it moves to zope.server's
    OverflowableBuffer (memory, then a temporary file), as before."""

    def __init__(self, overflow):
        self.overflow = overflow
        self.chunks = collections.deque()
        self.size = 0
        self.spilled = None

    def __len__(self):
        return len(self.spilled) if self.spilled is not None else self.size

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
        return self.spilled.getfile() if self.spilled is not None else io.BytesIO(b''.join(self.chunks))

    def close(self):
        if self.spilled is not None:
            self.spilled.close()
        self.chunks.clear()
        self.size = 0


_date = [0, '']


def http_date(now):
    """The Date header, formatted once per second."""
    second = int(now)
    if _date[0] != second:
        _date[:] = [second, build_http_date(second)]
    return _date[1]


class DrainingTask(HTTPTask):
    """Ends keep-alive once the worker drains, so clients reconnect to a
    worker that stays instead of losing their next request."""

    def prepareResponseHeaders(self):
        super().prepareResponseHeaders()
        if 'Date' in self.response_headers:
            self.response_headers['Date'] = http_date(self.start_time)
        if self.channel.server.draining and not self.close_on_finish:
            self.close_on_finish = 1
            self.response_headers['Connection'] = 'close'

    def write(self, data):
        # The header goes out with the first body chunk: one buffer append, one send.
        channel = self.channel
        if not self.wrote_header:
            head = self.buildResponseHeader()
            self.wrote_header = 1
            self.bytes_written += channel.write(head + data if data else head)
        elif data:
            self.bytes_written += channel.write(data)


class DrainingChannel(HTTPServerChannel):
    """Also: the pool thread that ran a request sends the response itself and
    hands the channel back without waking the loop through the trigger pipe.
    The channel stays registered for reading while its task runs, so the
    client's next request wakes the loop by itself; the trigger is pulled
    only when output is left (slow client, large response) or the channel
    must close."""

    task_class = DrainingTask

    def __init__(self, server, conn, addr, adj=None):
        super().__init__(server, conn, addr, adj)
        self.outbuf.close()  # the SpooledTemporaryFile DualModeChannel made
        self.outbuf = OutputBuffer(self.adj.outbuf_overflow)

    def readable(self):
        # In sync mode too: a pipelined request is parsed and queued
        # (queue_task appends under task_lock), an end of file is noticed.
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
            # A pool thread owns the channel: it closes when handed back.
            self.will_close = True

    def service(self):
        """ServerChannelBase.service, sending from this thread after each task."""
        while True:
            with task_lock:
                if self.tasks:
                    task = self.tasks.pop(0)
                else:
                    self.running_tasks = False
                    self.async_mode = True
                    self.last_activity = time.time()
                    if self.outbuf or self.will_close:
                        self.pull_trigger()  # the loop has work: wake it
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

    def del_channel(self, map=None):
        # zope.server's own del_channel looks the fd up after asyncore has
        # cleared it, so closed channels would stay in active_channels forever
        # (a leak per connection, and a drain that never sees them go).
        fd = self._fileno
        super().del_channel(map)
        self.active_channels.pop(fd, None)

    def busy(self):
        return bool(self.running_tasks or self.outbuf or self.proto_request is not None)


class SharedSocketServer(WSGIHTTPServer):
    """A WSGIHTTPServer on an already bound, listening socket."""

    channel_class = DrainingChannel
    draining = False

    def __init__(self, sock, application, name, host, task_dispatcher, hit_log=None):
        self._inherited = sock
        self.served = itertools.count(1)
        self.requests = 0
        # SERVER_PORT comes from this port argument: pass the real one.
        super().__init__(application, name, host, sock.getsockname()[1],
                         task_dispatcher=task_dispatcher, adj=adjustments(), hit_log=hit_log)

    def create_socket(self, family=None, type=None):
        self._inherited.setblocking(False)
        self.set_socket(self._inherited)

    def set_reuse_addr(self):
        pass

    def bind(self, address):
        pass

    def computeServerName(self, ip=''):
        # The base class does a reverse DNS lookup, which can stall start-up.
        return ip if ip not in ('', '0.0.0.0', '::') else socket.gethostname()

    def executeRequest(self, task):
        self.requests = next(self.served)
        super().executeRequest(task)

    _deferred_since = None
    _free_until = 0.0

    def handle_accept(self):
        # Workers share the socket and all wake for a new connection. One that
        # already has a connection per thread leaves it ACCEPT_DEFER_SECONDS to
        # the others (otherwise one worker can take most of a burst, and a
        # blocking app then runs on its threads only). A connection still
        # pending after that means every worker is as loaded: accept freely
        # for BACKLOG_FREE_SECONDS, so a large backlog is never slowed down.
        threads = len(getattr(self.task_dispatcher, 'threads', ())) or 1
        if len(DrainingChannel.active_channels) >= threads:
            now = time.monotonic()
            if now >= self._free_until:
                if self._deferred_since is None:
                    self._deferred_since = now
                    return
                if now - self._deferred_since < ACCEPT_DEFER_SECONDS:
                    return
                self._free_until = now + BACKLOG_FREE_SECONDS
        self._deferred_since = None
        super().handle_accept()

    def stop_accepting(self):
        self.draining = True
        self.accepting = False
        self.close()

    def channels(self):
        return list(DrainingChannel.active_channels.values())


def server_class(tracelog):
    """SharedSocketServer, or with zservertracelog its combination with
    zc.zservertracelog's server and channel, so that its B/I/C/A/E trace
    lines are written (logger zc.tracelog)."""
    if not tracelog:
        return SharedSocketServer
    from zc.zservertracelog import tracelog as zc_tracelog

    class TracingChannel(DrainingChannel, zc_tracelog.Channel):
        pass

    class TracingServer(SharedSocketServer, zc_tracelog.Server):
        channel_class = TracingChannel

    return TracingServer


def access_logger():
    """Combined log format lines on the `zkprefork.access` logger."""
    from zope.server.http.commonaccesslogger import CommonAccessLogger
    return CommonAccessLogger(logging.getLogger('zkprefork.access'))
