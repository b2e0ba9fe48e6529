"""zope.server, adapted to serve a socket bound by another process.

Import this module only in a worker, after fork: zope.server creates a
module-global wake-up pipe at import, and workers sharing one would steal
each other's wake-ups (requests stall until the poll timeout).
`fresh_wakeup()` replaces it all the same, for when the application
imported zope.server before fork (preload).
"""
import asyncore
import itertools
import logging
import queue
import resource
import socket
import time

from zope.server import dualmodechannel, trigger
from zope.server.adjustments import Adjustments
from zope.server.http.httpserverchannel import HTTPServerChannel
from zope.server.http.httptask import HTTPTask
from zope.server.http.wsgihttpserver import WSGIHTTPServer
from zope.server.serverchannelbase import task_lock
from zope.server.taskthreads import ThreadedTaskDispatcher


log = logging.getLogger('zkprefork.worker')


def fresh_wakeup():
    """Give this process its own trigger pipe and an empty socket map."""
    inherited = dualmodechannel.the_trigger
    asyncore.socket_map.clear()
    inherited.close()
    dualmodechannel.the_trigger = trigger.trigger()


def wake_loop():
    """Wake the asyncore loop from another thread."""
    dualmodechannel.the_trigger.pull_trigger()


def adjustments():
    adj = Adjustments()
    # The default limit (~97) counts idle keep-alive channels and would leave
    # clients waiting in the backlog; the real bound is the fd limit (poll()
    # is used, so fds above 1024 are fine).
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    adj.connection_limit = max(100, soft - 64)
    return adj


class TaskDispatcher(ThreadedTaskDispatcher):
    """zope.server's thread pool on a C queue: its queue.Queue costs a Python
    Condition per hand-off, which was half of a busy worker's time."""

    def __init__(self):
        super().__init__()
        self.queue = queue.SimpleQueue()


class DrainingTask(HTTPTask):
    """Ends keep-alive once the worker drains, so clients reconnect to a
    worker that stays instead of losing their next request."""

    def prepareResponseHeaders(self):
        super().prepareResponseHeaders()
        if self.channel.server.draining and not self.close_on_finish:
            self.close_on_finish = 1
            self.response_headers['Connection'] = 'close'

    def write(self, data):
        if self.request_data.command == 'HEAD':
            data = b''  # headers only, whatever the application returns (RFC 9110, 9.3.2)
        # The header goes out with the first chunk of the body: one append
        # to the output buffer and, for a small response, one send.
        if not isinstance(data, bytes):  # zc.zservertracelog writes a whole iterable
            super().write(data)
        elif not self.wrote_header:
            head = self.buildResponseHeader()
            self.wrote_header = 1
            self.bytes_written += self.channel.write(head + data if data else head)
        elif data:
            self.bytes_written += self.channel.write(data)


class DrainingChannel(HTTPServerChannel):
    """Also faster: the pool thread that ran a request sends the response
    itself and hands the channel back without waking the asyncore loop.

    zope.server's way has every request cross threads twice (the loop hands
    it to a pool thread, which wakes the loop through the trigger pipe to
    send the response), and each wake-up rebuilds the loop's poll set of
    every connection. Here the channel stays registered for reading while
    its task runs (a pipelined request is parsed and queued; an end of file
    is noticed), and the trigger is pulled only when output is left (a slow
    reader, a large response) or the channel must close."""

    task_class = DrainingTask

    def __init__(self, server, conn, addr, adj=None):
        super().__init__(server, conn, addr, adj)
        server.observer.channel_opened(self)  # scoreboard hook

    def readable(self):
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
            # A pool thread owns the channel (closing it now would fail
            # zope.server's assertion and kill the worker): the loop closes
            # it once it is handed back.
            self.will_close = True

    def service(self):
        """ServerChannelBase.service, sending from this thread after each task."""
        while True:
            with task_lock:
                if not self.tasks:
                    self.running_tasks = False
                    self.async_mode = True
                    self.last_activity = time.time()
                    if self.outbuf or self.will_close:
                        self.pull_trigger()  # the loop has work left: wake it
                    return
                task = self.tasks.pop(0)
            try:
                task.service()
            except:  # noqa: E722 as zope.server does: the channel stays serviced
                self.server.addTask(self)
                raise
            if not self.async_mode:
                self._send_now()

    def _send_now(self):
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
        self.server.observer.channel_closed(self)  # scoreboard hook

    def busy(self):
        return bool(self.running_tasks or self.outbuf or self.proto_request is not None)


class NoObserver:
    """A server's observer when it has no scoreboard."""

    def channel_opened(self, channel):
        pass

    def channel_closed(self, channel):
        pass

    def request_started(self, channel, request_line):
        pass

    def request_finished(self):
        pass

    def may_accept(self):
        return True


class SharedSocketServer(WSGIHTTPServer):
    """A WSGIHTTPServer on an already bound, listening socket."""

    channel_class = DrainingChannel
    draining = False

    def __init__(self, sock, application, name, host, task_dispatcher, hit_log=None, observer=None):
        self._inherited = sock
        # The worker's scoreboard.Scorekeeper: the hooks below tell it about
        # accepts, connections and requests (no-ops without one).
        self.observer = observer or NoObserver()
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
        self.observer.request_started(task.channel, task.request_data.first_line)  # scoreboard hook
        try:
            super().executeRequest(task)
        except Exception:
            log.exception('the application failed on %s', task.request_data.first_line)
            self._answer_failure(task)
        finally:
            self.observer.request_finished()  # scoreboard hook

    def readable(self):
        return super().readable() and self.observer.may_accept()  # scoreboard hook (balancing)

    @staticmethod
    def _answer_failure(task):
        """zope.server would close the connection without a word, or keep it
        open after a response cut short: a 500 if nothing was sent yet, else
        an end to the connection (the client must not wait for the rest)."""
        if task.wroteResponseHeader():
            task.close_on_finish = 1
            return
        body = b'Internal Server Error\n'
        task.setResponseStatus('500', 'Internal Server Error')
        task.accumulated_headers = None
        task.response_headers = {'Content-Type': 'text/plain; charset=utf-8',
                                 'Content-Length': str(len(body))}
        task.write(body)

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
