"""zope.server, adapted to serve a socket bound by another process.

The master imports it before forking (spawn.py), so that workers share its
pages, but zope.server creates a module-global wake-up pipe at import, and
workers sharing one would steal each other's wake-ups (requests stall until
the poll timeout): every worker calls `fresh_wakeup()` before it serves.
"""
import asyncore
import datetime
import logging
import operator
import os
import queue
import resource
import select
import socket
import ssl
import stat
import struct
import threading
import time

from zope.server import dualmodechannel, trigger
from zope.server.adjustments import Adjustments
from zope.server.http.httpserverchannel import HTTPServerChannel
from zope.server.http.httptask import HTTPTask
from zope.server.http.wsgihttpserver import WSGIHTTPServer
from zope.server.task import AbstractTask
from zope.server.serverchannelbase import task_lock
from zope.server.taskthreads import ThreadedTaskDispatcher

from zkprefork.worker import httprequest, outbuffer, tlsconnection, wsgi
from zkprefork import addresses, clock, health


log = logging.getLogger('zkprefork.worker')

# Connections a worker takes per turn of its loop when they wait: a turn of
# a loop holding hundreds of busy connections lasts tens of milliseconds,
# and at one accept a turn wrk's 1000 new connections waited for seconds.
ACCEPT_BATCH = 64


class ClientGone(ConnectionError):
    """The client closed the connection, or stopped reading."""


def fresh_wakeup():
    """Give this process its own trigger pipe and an empty socket map."""
    inherited = dualmodechannel.the_trigger
    asyncore.socket_map.clear()
    inherited.close()
    dualmodechannel.the_trigger = trigger.trigger()


def wake_loop():
    """Wake the asyncore loop from another thread."""
    dualmodechannel.the_trigger.pull_trigger()


def adjustments(options):
    adj = Adjustments()
    adj.http = options  # read by the request parser (zope.server hands it the adjustments)
    adj.send_bytes = 1 << 16  # per send(): zope.server's 9000 cost a syscall per 9 kB
    adj.outbuf_overflow = 2 * options.outbuf_high_watermark  # kept in memory: write_now bounds it
    adj.log_socket_errors = False  # a client that goes is no error of ours
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

    def shutdown(self, cancel_pending=True, timeout=5):
        """zope.server's, waiting for the threads on the monotonic clock: on
        its wall clock, a step back during the wait kept a worker with a
        stuck thread until the master killed it."""
        self.setThreadCount(0)
        deadline = clock.now() + timeout
        while self.threads and clock.now() < deadline:
            time.sleep(0.1)
        if self.threads:
            log.error('%d thread(s) still running', len(self.threads))
        if cancel_pending:
            self._cancel_queued()

    def _cancel_queued(self):
        while True:
            try:
                task = self.queue.get_nowait()
            except queue.Empty:
                return
            if task is not None:  # None: setThreadCount's stop sign for a thread
                task.cancel()


class WSGITask(HTTPTask):
    """A request to answer: the application's (the environ of PEP 3333,
    100 Continue on the first read of a body the client holds back, the
    body streamed as it is made), or the server's own refusal of a request
    it would not pass on."""

    chunked_response = False  # the body goes out in chunks (HTTP/1.1 without Content-Length)
    no_body = False           # HEAD, 204, 304
    body_limit = None         # the Content-Length the application declared
    counted = False           # the scoreboard counts this task's thread busy
    body_sent = 0
    failed = False            # cut short: no last chunk, and the connection closes
    app_close = False         # the application's Connection field said close
    warned = False            # something the application sent was dropped, and logged

    def __init__(self, channel, request_data):
        super().__init__(channel, request_data)
        if request_data.expect_continue:
            request_data.when_body_read(self._send_continue)

    def _send_continue(self):
        # Only now (RFC 9110, 10.1.1): an application may answer without reading.
        if not self.wrote_header:
            self.channel.write(b'HTTP/1.1 100 Continue\r\n\r\n')
            self.channel.send_now()

    def _do_service(self):
        refused = self.request_data.error
        if refused is None:
            super()._do_service()
        else:
            self.answer(refused.status, refused.reason, f'{refused.reason}: {refused.detail}\n')

    def answer(self, status, reason, text):
        """A plain-text response of the server's own (an error)."""
        body = text.encode()
        self.body_limit = None
        self.setResponseStatus(str(status), reason)
        self.accumulated_headers = None
        self.response_headers = {'Content-Type': 'text/plain; charset=utf-8',
                                 'Content-Length': str(len(body))}
        self.write(body)

    # Response splitting: the application's error, raised in start_response.
    def setResponseStatus(self, status, reason):
        wsgi.check_header_text(f'{status} {reason}')
        super().setResponseStatus(status, reason)
        self.app_close = False  # start_response again (exc_info): new fields

    def appendResponseHeaders(self, lst):
        """The application's fields, less the framing that is the server's:
        Connection (a close in it ends the connection, announced by the one
        Connection field the server writes) and Content-Length on a 204,
        which RFC 9110 8.6 forbids (Varnish answers 503 to it). The 204 is
        sent without it rather than made a 500: its framing does not depend
        on the field, and frameworks send "Content-Length: 0" with it
        (werkzeug drops it itself); another length meant a body: logged."""
        kept = []
        for line in lst:
            wsgi.check_header_text(line)
            name, _, value = line.partition(':')
            name = name.lower()
            if name == 'connection':
                self.app_close |= 'close' in {token.strip().lower() for token in value.split(',')}
            elif name == 'content-length' and self.status == '204':
                if int(value):
                    self._warn_dropped(f'Content-Length: {int(value)}')
            else:
                kept.append(line)
        super().appendResponseHeaders(kept)

    def _warn_dropped(self, what):
        """Once a response: an application that sends one wrong thing often
        sends several (a length, then the body)."""
        if not self.warned:
            self.warned = True
            log.warning('the application sent %s with its %s response to %s: not sent',
                        what, self.status, self.request_data.first_line)

    def prepareResponseHeaders(self):
        """zope.server's choice of keeping the connection, and its Server and
        Date fields, in one pass over the application's header lines; the
        framing of the body: the application's Content-Length (enforced),
        else chunked for HTTP/1.1, else the end of the connection."""
        request = self.request_data
        names = {name.lower(): value for name, _, value in map(
            operator.methodcaller('partition', ':'), self.accumulated_headers or ())}
        headers = self.response_headers
        self.no_body = request.command == 'HEAD' or self.status in wsgi.NO_BODY
        if 'content-length' in names:
            self.body_limit = int(names['content-length'])  # ValueError: the application's error
        framed = self.body_limit is not None or 'Content-Length' in headers or self.no_body
        if not framed and self.version == '1.1':
            framed = self.chunked_response = True
            headers['Transfer-Encoding'] = 'chunked'
        close = (not request.keep_alive or not framed or self.app_close
                 # Ends keep-alive once the worker drains, so clients reconnect
                 # to a worker that stays instead of losing their next request.
                 or self.channel.server.draining
                 or (request.expect_continue and not request.completed))
        self.close_on_finish = close
        if close:
            headers['Connection'] = 'close'
        elif self.version == '1.0':
            headers['Connection'] = 'Keep-Alive'
        server = self.channel.server.SERVER_IDENT
        if 'server' in names:
            headers['Via'] = server
        else:
            headers['Server'] = server
        if 'date' not in names:
            headers['Date'] = wsgi.http_date(self.start_time)
        if health.CHECK_KEY in request.headers:
            headers[health.ANSWER_FIELD] = str(os.getppid())  # see health.py

    def buildResponseHeader(self):
        self.prepareResponseHeaders()
        lines = [f'HTTP/{self.version} {self.status} {self.reason}']
        lines += [f'{name}: {value}' for name, value in self.response_headers.items()]
        lines += self.accumulated_headers or ()
        # PEP 3333: latin-1; anything else is the application's error (a 500)
        return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')

    def getCGIEnvironment(self):
        """PEP 3333's environ: PATH_INFO is the unquoted path's bytes as
        latin-1, every header field is HTTP_*, CONTENT_LENGTH is the body's
        length (absent when a chunked body is read as it arrives)."""
        if self.cgi_env is not None:
            return self.cgi_env
        request, channel = self.request_data, self.channel
        server = channel.server
        env = {'REQUEST_METHOD': request.command, 'SCRIPT_NAME': '', 'PATH_INFO': request.path,
               'QUERY_STRING': request.query or '', 'SERVER_NAME': server.server_name,
               'SERVER_PORT': str(server.port), 'SERVER_PROTOCOL': f'HTTP/{request.version}',
               'SERVER_SOFTWARE': server.SERVER_IDENT, 'GATEWAY_INTERFACE': 'CGI/1.1',
               'REMOTE_ADDR': channel.addr[0], 'CHANNEL_CREATION_TIME': str(channel.creation_time),
               'REMOTE_PORT': str(channel.addr[1]), 'RAW_URI': request.uri, 'REQUEST_URI': request.uri,
               'wsgi.input_terminated': True, 'wsgi.file_wrapper': wsgi.FileWrapper}
        for key, value in request.headers.items():
            if key not in ('CONTENT_LENGTH', 'CONTENT_TYPE'):
                key = 'HTTP_' + key
            env[key] = value
        if 'CONTENT_LENGTH' in env or (request.chunked and not request.expect_continue):
            env['CONTENT_LENGTH'] = str(request.content_length)
        if channel.tls_environ:
            env.update(channel.tls_environ)  # HTTPS=on makes zope.server's wsgi.url_scheme https
        self.cgi_env = env
        return env

    def write(self, data):
        """Send a piece of the body now (the header goes with the first)."""
        if not isinstance(data, bytes):  # zc.zservertracelog writes a whole iterable
            for piece in data:
                self.write(piece)
            return
        if not self.wrote_header:
            head = self.buildResponseHeader()
            self.wrote_header = 1
            data = head + self._frame(data)
        elif data:
            data = self._frame(data)
        else:
            return
        if self.no_body or (self.body_limit is not None and self.body_sent >= self.body_limit):
            self.response_complete()
        self.bytes_written += self.channel.write_now(data)

    def _frame(self, data):
        if self.no_body:
            # Whatever the application returns (RFC 9110, 6.4.1 and 9.3.2):
            # a body for HEAD is expected (PEP 3333), one for 204/304 a mistake.
            if data and self.request_data.command != 'HEAD':
                self._warn_dropped(f'{len(data)} bytes of body')
            return b''
        if self.body_limit is not None and len(data) > self.body_limit - self.body_sent:
            log.warning('the application sent more than its Content-Length %d on %s: cut',
                        self.body_limit, self.request_data.first_line)
            data = data[:self.body_limit - self.body_sent]
        self.body_sent += len(data)
        if self.chunked_response and data:
            return b'%x\r\n%s\r\n' % (len(data), data)
        return data

    def finish(self):
        if not self.wrote_header:
            self.write(b'')
        if self.chunked_response and not self.failed:
            self.bytes_written += self.channel.write_now(b'0\r\n\r\n')
        elif self.body_limit is not None and self.body_sent < self.body_limit and not self.no_body:
            self.close_on_finish = 1  # the client must not wait for the rest
        AbstractTask.finish(self)

    def response_complete(self):
        """Tell the scoreboard this thread is free, once per request and
        before the response's last bytes go: a client that has its whole
        response may open its next connection at once, and balancing must
        not see this thread busy then (it did, and sent that connection to
        a worker with no free thread)."""
        if self.counted:
            self.counted = False
            self.channel.server.observer.response_complete()

    def sendfile(self, file):
        """Send `file` from its position with os.sendfile; False (nothing
        sent) when it is no regular file or the body is chunked."""
        try:
            fd = file.fileno()
            info = os.fstat(fd)
            offset = file.tell()
        except (AttributeError, OSError, ValueError):
            return False
        if not stat.S_ISREG(info.st_mode) or not self.channel.zero_copy:
            return False
        self.write(b'')
        if self.chunked_response or self.no_body:
            return False
        count = info.st_size - offset
        if self.body_limit is not None:
            count = min(count, self.body_limit - self.body_sent)
        sent = self.channel.sendfile(fd, offset, count)
        self.body_sent += sent
        self.bytes_written += sent
        return True


def wait_writable(fd, timeout):
    """Wait until `fd` takes more output; ClientGone after `timeout` seconds."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(timeout * 1000):
        raise ClientGone(f'the client read nothing for {timeout:g} s')


class SendingMixin:
    """The sending side of an HTTPChannel, run by the thread that owns the
    channel (the pool thread running its task, else the loop): a response
    goes out as it is made, and a client that stops reading or goes ends
    it (ClientGone) instead of filling memory."""

    def send(self, data):
        """asyncore's send, but a gone client raises ClientGone (asyncore
        returned 0 and the application went on producing for no one)."""
        try:
            return self.socket.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0  # (OpenSSL's two: a TLS connection's socket)
        except OSError as error:
            raise ClientGone(f'the client is gone: {error}') from error

    def close_when_done(self):
        try:
            super().close_when_done()
        except ClientGone:
            self.will_close = True  # nothing more can be sent: the loop closes it
            if not self.async_mode:
                self.async_mode = True
                self.pull_trigger()

    def write_now(self, data):
        """Queue `data` and send what the socket takes now; past the output
        high-water mark, wait for the client to read (ClientGone if it does
        not within send_timeout). A large piece goes in slices, so that the
        buffer stays in memory."""
        mark = self.adj.http.outbuf_high_watermark
        if len(data) <= mark:
            pieces = (data,)
        else:
            view = memoryview(data)
            pieces = (view[start:start + mark] for start in range(0, len(data), mark))
        outbuf = self.outbuf
        for piece in pieces:
            outbuf.append(piece)
            while self._flush_some():
                pass
            while len(outbuf) > mark:
                wait_writable(self._fileno, self.adj.http.send_timeout)
                while self._flush_some():
                    pass
        return len(data)

    def sendfile(self, fd, offset, count):
        """os.sendfile `count` bytes of `fd` from `offset`, after what is
        queued; returns the bytes sent."""
        while self.outbuf:
            wait_writable(self._fileno, self.adj.http.send_timeout)
            while self._flush_some():
                pass
        sent = 0
        while sent < count:
            try:
                done = os.sendfile(self._fileno, fd, offset + sent, count - sent)
            except (BlockingIOError, InterruptedError):
                wait_writable(self._fileno, self.adj.http.send_timeout)
                continue
            except OSError as error:
                raise ClientGone(f'the client is gone: {error}') from error
            if not done:
                break  # the file is shorter than it was
            sent += done
        return sent

    def send_now(self):
        try:
            while self._flush_some():
                pass
        except OSError:
            # The client is gone: the loop closes the channel once handed
            # back, and nothing it sent runs any more.
            self.will_close = True
            self._drop_queued()


class HTTPChannel(SendingMixin, HTTPServerChannel):
    """A connection: requests read by llhttp (httprequest.Request), at most
    one ahead of the one running, none after one that ends the connection.

    Also faster: the pool thread that ran a request sends the response
    itself and hands the channel back without waking the asyncore loop.
    zope.server's way has every request cross threads twice (the loop hands
    it to a pool thread, which wakes the loop through the trigger pipe to
    send the response), and each wake-up rebuilds the loop's poll set of
    every connection. Here the channel stays registered for reading while
    its task runs (the next request is parsed and queued; an end of file is
    noticed), and the trigger is pulled only when output is left (a slow
    reader, a large response), the channel must close, or reading resumes
    after input waited for a request to finish."""

    task_class = WSGITask
    parser_class = httprequest.Request
    inbuf = b''     # input not parsed yet: it waits while a request is queued
    abandoned = None  # the request being read when the input ended, until the connection ends
    ended = False   # a request that ends the connection was read: nothing after it is
    active_at = 0.0  # clock.now() of the last byte in or out, or of the last task's end
    tls_environ = None  # a TLS connection's SSL_* environ (tlsconnection.TLSChannel)
    zero_copy = True  # a response's file may go by os.sendfile
    gone = False    # the client went, or read nothing for send_timeout: nothing more is sent

    def __init__(self, server, conn, addr, adj=None):
        self.parse_lock = threading.Lock()  # the loop reads; a pool thread resumes parsing
        super().__init__(server, conn, addr, adj)
        self.outbuf = outbuffer.OutputBuffer(self.adj.outbuf_overflow)  # in memory, unlike zope.server's
        server.observer.channel_opened(self)  # scoreboard hook

    def readable(self):
        return not self.will_close and not self.inbuf

    def handle_read(self):
        if self.will_close:
            return
        try:
            data = self.recv(self.adj.recv_bytes)
        except OSError:
            self.handle_comm_error()
            return
        self.active_at = clock.now()
        if data:
            self.received(data)

    def received(self, data):
        with self.parse_lock:
            if not self.ended:
                self.inbuf = self.inbuf + data if self.inbuf else data
                self._parse()

    def _parse(self):
        """Queue the requests in self.inbuf, as long as none waits to run
        (parse_lock held). A request that expects 100-continue is queued
        once its headers are in: the application reads its body as it comes."""
        while self.inbuf and not self.ended:
            request = self.proto_request
            if request is None:
                if self.tasks:
                    return
                request = self.proto_request = self.parser_class(self.adj)
            self.inbuf = self.inbuf[request.received(self.inbuf):]
            if request.completed:
                self.proto_request = None
                if not request.keep_alive:
                    self._end()
            if not request.dispatched and (request.completed or request.expect_continue):
                request.dispatched = True
                self.handle_request(request)

    def _end(self):
        """No request after this point of the input is read (parse_lock held).
        One still being read is kept for _release: its task may still run."""
        self.ended = True
        self.inbuf = b''
        if self.proto_request is not None:
            self.abandoned = self.proto_request
        self.proto_request = None

    def handle_close(self):
        request = self.proto_request
        if request is not None:
            request.fail_body('the client closed the connection')
        if self.async_mode:
            self.close()
        else:
            # A pool thread owns the channel (closing it now would fail
            # zope.server's assertion and kill the worker): the loop closes
            # it once it is handed back.
            self.will_close = True

    def expire_stalled(self, now):
        """408 and the end of the connection for a request whose headers took
        longer than request_read_timeout, or whose body stopped arriving; the
        end of a connection idle for keepalive seconds, or whose client has
        read none of the output waiting for it for send_timeout seconds."""
        if self.async_mode and (self.gone or self._output_stalled(now)):
            self._reset()
            return
        request = self.proto_request
        if request is None:
            self._close_if_idle(now)
            return
        timeout = self.adj.http.request_read_timeout
        if request is None or self.will_close or self.ended or (
                now - request.started < timeout if not request.headers_complete
                else self.idle_for(now) < timeout and not request.body_too_slow(now)):
            return
        refused = httprequest.RequestRefused(408, f'no complete request within {timeout:g} s')
        with self.parse_lock:
            if request is not self.proto_request:
                return
            self._end()
            dispatched = request.dispatched
            request.refuse(refused)  # a task reading its body gets an error
            request.dispatched = True
        if not dispatched:
            self.handle_request(request)

    def _output_stalled(self, now):
        return self.outbuf and self.idle_for(now) >= self.adj.http.send_timeout

    def _reset(self):
        """Close with a reset (SO_LINGER 0), from the loop's thread: a
        client that reads nothing is gone in all but name, and a plain close
        would leave its output queued in the kernel for as long as the
        client keeps its window shut."""
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        except OSError:
            pass  # already reset by the client
        self.outbuf.close()
        self.close()

    def _close_if_idle(self, now):
        """Close the connection (from the loop's thread) if it has carried
        nothing for keepalive seconds: no byte yet, or none since the last
        response, and no task, input or output pending."""
        if (self.async_mode and not self.will_close and not self.busy()
                and self.idle_for(now) >= self.adj.http.keepalive):
            self.close()

    def idle_for(self, now):
        """Seconds without activity at `now` (clock.now())."""
        return now - self.active_at

    # zope.server sets last_activity = time.time() (on accepting, sending,
    # going asynchronous), and it and the worker's drain compare it with
    # time.time(): kept on the monotonic clock, so that a wall-clock step
    # between a write and a read is no idle time.
    @property
    def last_activity(self):
        return clock.as_wall_clock(self.active_at)

    @last_activity.setter
    def last_activity(self, wall_time):
        self.active_at = clock.now()  # every writer means "now"

    def check_maintenance(self, now):
        # zope.server passes its wall-clock creation_time: the sweep's
        # schedule (cleanup_interval) is kept on the monotonic clock too.
        super().check_maintenance(clock.now())

    def kill_zombies(self):
        """zope.server's sweep of channels idle for channel_timeout, on the
        monotonic clock."""
        now = clock.now()
        for channel in list(self.active_channels.values()):
            if (channel is not self and not channel.running_tasks
                    and channel.idle_for(now) >= self.adj.channel_timeout):
                channel.close()

    def service(self):
        """ServerChannelBase.service, sending from this thread after each task."""
        while True:
            with task_lock:
                if not self.tasks:
                    self.running_tasks = False
                    self.async_mode = True
                    self.active_at = clock.now()
                    if self.outbuf or self.will_close:
                        self.pull_trigger()  # the loop has work left: wake it
                    return
                task = self.tasks.pop(0)
            if self.inbuf and not self.tasks and not self.will_close:
                # (with input waiting, will_close means a send failed: the client is gone)
                self._parse_ahead()
            try:
                task.service()
            except:  # noqa: E722 as zope.server does: the channel stays serviced
                self.server.addTask(self)
                raise
            if task.close_on_finish:
                self._drop_queued()
            elif not self.async_mode:
                self.send_now()

    def _parse_ahead(self):
        with self.parse_lock:
            self._parse()
            resumed = not self.inbuf
        if resumed:
            self.pull_trigger()  # the loop left this channel out of its poll set while input waited

    def _drop_queued(self):
        """The response ended the connection: what was read after it never runs."""
        with self.parse_lock:
            self._end()
        with task_lock:
            self.tasks = []

    def handle_comm_error(self):
        # A socket error is the client's doing, not a bug to log.
        if self.async_mode:
            self.close()
        else:
            self.will_close = True

    def del_channel(self, map=None):
        # zope.server's own del_channel looks the fd up after asyncore has
        # cleared it, so closed channels would stay in active_channels forever
        # (a leak per connection, and a drain that never sees them go).
        fd = self._fileno
        super().del_channel(map)
        self.active_channels.pop(fd, None)
        self._release()
        self.server.observer.channel_closed(self)  # scoreboard hook

    def _release(self):
        """The one place a connection's resources go, however it ended:
        the request being read (its parser and spool file) and the input
        waiting. Not left to the garbage collector: a pool thread holds on
        to the last channel it served, and request and parser form a cycle."""
        with self.parse_lock:
            self._end()
            request, self.abandoned = self.abandoned, None
        if request is not None:
            request.close()

    def busy(self):
        return bool(self.running_tasks or self.outbuf or self.proto_request is not None or self.inbuf)


class NoObserver:
    """A server's observer when it has no scoreboard."""

    def channel_opened(self, channel):
        pass

    def channel_closed(self, channel):
        pass

    def request_started(self, channel, request_line):
        pass

    def response_complete(self):
        pass

    def request_finished(self):
        pass

    def decide_accepting(self):
        return True

    def may_accept(self):
        return True

    def handshake_completed(self):
        pass

    def handshake_failed(self, reason):
        pass


class SharedSocketServer(WSGIHTTPServer):
    """A WSGIHTTPServer on an already bound, listening socket."""

    channel_class = HTTPChannel
    draining = False

    def __init__(self, sock, application, name, host, task_dispatcher, hit_log, options, observer=None,
                 tls_context=None):
        self._inherited = sock
        self.handshakes = None
        self.forwarded = wsgi.ForwardedPeers(options.forwarded_allow_ips)
        # The worker's scoreboard.Scorekeeper: the hooks below tell it about
        # accepts, connections and requests (no-ops without one).
        self.observer = observer or NoObserver()
        # SERVER_PORT comes from this port argument: pass the real one.
        super().__init__(application, name, host, sock.getsockname()[1], task_dispatcher=task_dispatcher,
                         adj=adjustments(options), hit_log=hit_log)
        if tls_context is not None:
            # zope.server's handle_accept makes channel_class(self, conn, addr, adj):
            # with TLS, a handshake comes first, then the TLS-aware channel.
            self.handshakes = tlsconnection.Handshakes(
                tls_context, tlsconnection.tls_channel_class(self.channel_class), self.observer)
            self.channel_class = self.handshakes.begin

    def _constructWSGIEnvironment(self, task):
        env = super()._constructWSGIEnvironment(task)
        self.forwarded.apply(env)
        return env

    def create_socket(self, family=None, type=None):
        self._inherited.setblocking(False)
        self.set_socket(self._inherited)

    def set_reuse_addr(self):
        pass

    def bind(self, address):
        pass

    def accept_connections(self):
        # Upstream's calls listen(adj.backlog) again: on the shared socket
        # that would set the master's backlog (listener.BACKLOG) to zope's
        # for every worker. The master listens already.
        self.accepting = True

    def computeServerName(self, ip=''):
        # The base class does a reverse DNS lookup, which can stall start-up.
        return ip if not addresses.is_wildcard(ip) else socket.gethostname()

    def executeRequest(self, task):
        self.observer.request_started(task.channel, task.request_data.first_line)  # scoreboard hook
        task.counted = True  # a refused request never ran here: its answer tells nothing
        try:
            self.run_application(task)
        except ClientGone:
            task.failed = True
            task.close_on_finish = 1
            task.channel.outbuf.close()  # for no one: this thread owns the channel still
            task.channel.gone = True  # the loop resets it: a close would wait to send for ever
        except httprequest.RequestBodyTimeout as error:
            self._answer_failure(task, 408, 'Request Timeout', f'Request Timeout: {error}\n')
        except Exception:
            log.exception('the application failed on %s', task.request_data.first_line)
            self._answer_failure(task, 500, 'Internal Server Error', 'Internal Server Error\n')
        finally:
            task.response_complete()
            self.observer.request_finished()  # scoreboard hook

    def readable(self):
        return super().readable() and self.observer.may_accept()  # scoreboard hook (balancing)

    def handle_accept(self):
        """Take up to ACCEPT_BATCH waiting connections, asking balancing
        before each one: what the loop decided before it polled may be stale
        by now (the other worker has freed a thread since, and every worker
        was woken for this connection), and a burst still spreads over the
        workers."""
        for _ in range(ACCEPT_BATCH):
            if not (self.observer.decide_accepting() and super().readable()):
                return  # this one is another worker's: it was woken for it too
            held = len(self._map)
            super().handle_accept()
            if len(self._map) == held:
                return  # none was waiting

    def run_application(self, task):
        """WSGIHTTPServer.executeRequest, with a start_response that refuses
        what would split the response. An application that fails on a body
        the server refused while it read it (507 for a full disk) gets the
        server's answer, logged once where it was refused: no 500, no traceback."""
        try:
            self._run_application(task)
        except ClientGone:
            raise
        except Exception:
            refused = task.request_data.error
            if refused is None:
                raise
            self._answer_failure(task, refused.status, refused.reason, f'{refused.reason}: {refused.detail}\n')

    def _run_application(self, task):
        result = self.application(self._constructWSGIEnvironment(task), wsgi.start_response_for(task))
        try:
            if not (isinstance(result, wsgi.FileWrapper) and task.sendfile(result.file)):
                for data in result:
                    task.write(data)
        finally:
            if hasattr(result, 'close'):
                result.close()

    @staticmethod
    def _answer_failure(task, status, reason, text):
        """zope.server would close the connection without a word, or keep it
        open after a response cut short: this answer if nothing was sent yet,
        else an end to the connection (the client must not wait for the rest)."""
        if task.wroteResponseHeader():
            task.failed = True
            task.close_on_finish = 1
        else:
            task.answer(status, reason, text)

    def stop_accepting(self):
        self.draining = True
        self.accepting = False
        self.close()

    def channels(self):
        """The connections: channels, and TLS handshakes in progress (which
        are busy, and expire after request_read_timeout)."""
        handshaking = list(self.handshakes.pending) if self.handshakes else []
        return list(HTTPChannel.active_channels.values()) + handshaking

    def expire_stalled_requests(self):
        """Answer 408 to requests whose headers or body stopped arriving
        (the worker's loop calls it about once a second)."""
        now = clock.now()
        for channel in self.channels():
            channel.expire_stalled(now)


def server_class(tracelog):
    """SharedSocketServer, or with zservertracelog its combination with
    zc.zservertracelog's server and channel, so that its B/I/C/A/E trace
    lines are written (logger zc.tracelog)."""
    if not tracelog:
        return SharedSocketServer
    from zc.zservertracelog import tracelog as zc_tracelog

    class TracedRequest(httprequest.Request):
        def __init__(self, adj):
            super().__init__(adj)
            self._Channel__B = datetime.datetime.now()  # zc.zservertracelog's B line reads it

    class TracingChannel(HTTPChannel, zc_tracelog.Channel):
        parser_class = TracedRequest

    class TracingServer(SharedSocketServer, zc_tracelog.Server):
        channel_class = TracingChannel
        run_application = zc_tracelog.Server.executeRequest

    return TracingServer


def access_logger():
    """Combined log format lines on the `zkprefork.access` logger."""
    from zope.server.http.commonaccesslogger import CommonAccessLogger
    return CommonAccessLogger(logging.getLogger('zkprefork.access'))
