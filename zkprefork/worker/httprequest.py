"""HTTP/1.1 requests parsed by llhttp (httptools), in the shape zope.server's
channels and tasks read (its `HTTPRequestParser` interface: `received()`,
`completed`, `first_line`, `command`, `uri`, `version`, `path`, `query`,
`headers`, `getBodyStream()`).

llhttp does the parsing and is strict by default (RFC 9112): what it
refuses becomes a 400. This module only maps its callbacks and enforces the
rules it leaves to the server: the limits (`HTTPOptions`), a transfer coding
other than chunked (501), Transfer-Encoding in HTTP/1.0, a missing or
duplicated Host, a request line of another shape than
``method SP request-target SP HTTP-version`` (400), versions other than
1.0 and 1.1 (505), and header names containing ``_``, which are dropped
(they would alias a name with ``-`` in the WSGI environ). Trailer fields
are counted against the limits and dropped.

One `Request` reads one message. It feeds llhttp the input in pieces that
end where a message can end (after a blank line, or at the last byte of a
Content-Length body), so that it stops exactly at the end of its request
and the channel decides when to parse the next one.
"""
import dataclasses
import errno
import ipaddress
import logging
import re
import tempfile
import threading
import time
import weakref
from io import BytesIO
from urllib.parse import unquote_to_bytes

import httptools

from zkprefork import settings

log = logging.getLogger('zkprefork.worker')

REASONS = {400: 'Bad Request', 408: 'Request Timeout', 413: 'Content Too Large', 414: 'URI Too Long',
           431: 'Request Header Fields Too Large', 500: 'Internal Server Error', 501: 'Not Implemented',
           505: 'HTTP Version Not Supported', 507: 'Insufficient Storage'}
# A body the server cannot store for want of space is RFC 4918 11.5's 507:
# a 5xx (the server's failure, not the client's), which clients that do not
# know it read as 500 (RFC 9110 15), and which says what to fix. Any other
# failure to store it is a plain 500.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
END_OF_HEAD = b'\r\n\r\n'
# RFC 9112 3.2: Host = uri-host [ ":" port ], uri-host being RFC 3986's
# IP-literal, IPv4address or reg-name (pct-encoded octets that are no controls).
HOST = re.compile(r"(?:\[(?P<literal>[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[-\w.~!$&'()*+,;=:]+)\]"
                  r"|(?:[-A-Za-z0-9._~!$&'()*+,;=]|%(?![01]|7[Ff])[0-9A-Fa-f]{2})*)(?::[0-9]*)?", re.ASCII)
AUTHORITY = re.compile(rb'[^/?#]*')  # RFC 3986 3.2
# RFC 3986 2: unreserved, reserved and "%"; llhttp lets "<>\^`{|} and obs-text by
TARGET_CHARS = re.compile(rb"[-A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%]*")
TCHARS = re.compile(rb"[-!#$%&'*+.^_`|~A-Za-z0-9]*")  # RFC 9110 5.6.2: a token's characters
EMPTY_LINES = re.compile(rb'(?:\r\n)*')
CHUNK_LINE = 32  # bytes of a chunk's size line and CRLFs not counted as extensions


def _from_settings(cls, checked):
    return cls(**{field.name: getattr(checked, field.name) for field in settings.HTTP})


# The options Settings marks `http` (their defaults, ranges and meaning are
# declared there, once): limits in bytes or fields, durations in seconds.
HTTPOptions = dataclasses.make_dataclass(
    'HTTPOptions', [(field.name, field.type) for field in settings.HTTP], frozen=True,
    namespace={'from_settings': classmethod(_from_settings), '__module__': __name__,
               '__doc__': 'The HTTP options of a worker: HTTPOptions.from_settings(Settings).'})


class RequestRefused(Exception):
    """The server answers the request itself with `status` and closes."""

    def __init__(self, status, detail):
        super().__init__(f'{status} {REASONS[status]}: {detail}')
        self.status, self.reason, self.detail = status, REASONS[status], detail


class RequestBodyTimeout(OSError):
    """The application read a body that arrived too slowly: the server
    answers 408 and closes."""


class _Overrun(Exception):
    """llhttp began a second message in one piece (should not happen)."""


def unknown_method(line):
    """The answer to a method llhttp refused, from `line`, the request line
    as far as it came: 501 if it starts with a token and SP (RFC 9110 9.1),
    400 if anything else ends the method, None while it is all token
    characters. llhttp refuses at the first byte that begins no method it
    knows (the O of FOO): deciding there would answer 'FO' + 'O /' with 400
    and 'FOO /' with 501. The answer must depend on the bytes alone."""
    end = TCHARS.match(line).end()
    if end == len(line):
        return None
    if end and line[end] == 0x20:
        return RequestRefused(501, 'an unknown method')
    return RequestRefused(400, 'an invalid method')


def split_target(target, command):
    """A request-target (RFC 9112 3.2) -> (path, query) as bytes, and the
    scheme and authority (str) of the absolute form, else None, None.
    Raises RequestRefused for any other form."""
    scheme = authority = None
    if target[:1] == b'/':
        path, _, query = target.partition(b'?')
    elif target == b'*' and command == 'OPTIONS':
        path, query = b'*', b''
    elif command != 'CONNECT' and b'://' in target:
        url = httptools.parse_url(target)  # absolute-form (RFC 9112, 3.2.2)
        path, query = url.path or b'/', url.query or b''
        scheme = url.schema.decode('latin-1')
        authority = absolute_authority(target, url, scheme)
    else:
        raise RequestRefused(400 if command != 'CONNECT' else 501, 'unsupported request-target form')
    if b'#' in target:
        raise RequestRefused(400, 'a fragment in the request target')
    if not TARGET_CHARS.fullmatch(target):
        raise RequestRefused(400, 'a character outside RFC 3986 in the request target')
    return path, query, scheme, authority


def absolute_authority(target, url, scheme):
    """The Host of an absolute-form target: its authority, without userinfo
    (RFC 9110 4.2.4), for the schemes http and https only."""
    if scheme.lower() not in ('http', 'https') or not target.startswith(url.schema + b'://'):
        raise RequestRefused(400, 'a request target with a scheme other than http or https')
    authority = AUTHORITY.match(target, len(url.schema) + 3)[0].decode('latin-1')
    if '@' in authority:
        raise RequestRefused(400, 'userinfo in the request target')
    if not url.host or not valid_host(authority):
        raise RequestRefused(400, 'an invalid authority in the request target')
    return authority


class BodyReading:
    """The body side of a Request: where llhttp's body callbacks put it
    (a Body), its bounds, and what the task reads it through. The head
    side (Request) decides the framing and calls `_expect_body()`."""

    expect_continue = False
    chunked = False
    content_length = 0
    _remaining = None       # bytes of a Content-Length body still to come
    _body_size = _framing = _chunks = 0
    _body = None

    def _expect_body(self):
        expect = self.headers.get('EXPECT', '').lower()
        self.expect_continue = self.version == '1.1' and expect == '100-continue'
        self._body = Body(self.expect_continue, self.limits)

    def _count_chunk_framing(self, size):
        """Bound the chunk extensions and the trailer section: httptools
        does not pass them on, so the bytes of a chunked body that are not
        data, beyond CHUNK_LINE per chunk, count against
        limit_request_header_size."""
        self._framing += size
        limit = self.limits.limit_request_header_size
        if self._framing - self._body_size - CHUNK_LINE * self._chunks > limit:
            raise RequestRefused(431, f'chunk extensions and trailer fields larger than {limit} bytes')

    def on_chunk_header(self):
        self._chunks += 1

    def on_body(self, data):
        self._body_size += len(data)
        if self._body_size > self.limits.max_request_body_size:
            raise RequestRefused(413, f'body larger than {self.limits.max_request_body_size} bytes')
        if self._remaining is not None:
            self._remaining -= len(data)
        try:
            self._body.append(data)
        except OSError as error:
            status = 507 if error.errno in NO_SPACE else 500
            # The one report of it: the client gets no detail of the server's.
            log.error('cannot store the request body of %s (answered %d): %s', self.first_line, status, error)
            raise RequestRefused(status, 'the server could not store the request body') from None

    def on_message_complete(self):
        self.completed = True
        if self._body is not None:
            self._body.finish()
            if self.chunked and not self.expect_continue:
                self.content_length = self._body_size

    # -- for the task --

    def getBodyStream(self):
        if self._body is None:
            return BytesIO(b'')
        return self._body.stream()

    def body_too_slow(self, now):
        """Whether the body, begun but not complete, is late at `now`
        (time.monotonic())."""
        return self._body is not None and not self.completed and now > self._body.deadline()

    def when_body_read(self, callback):
        """Call `callback` (once) when the application first reads the body."""
        if self._body is not None:
            # Weakly: the callback is the task's, which holds this request
            # (a cycle, were it strong, for an application that never reads).
            self._body.on_first_read = weakref.WeakMethod(callback)

    def fail_body(self, error):
        """The client is gone or too slow: a reader of the body gets OSError."""
        if self._body is not None:
            self._body.fail(error)


class Request(BodyReading):
    """One HTTP request read by llhttp, its head parsed and bounded here
    (the body: BodyReading); zope.server's request-data interface."""

    completed = False
    empty = False           # zope.server's channel reads it; never true here
    error = None            # a RequestRefused: answered by the server, not the application
    keep_alive = False      # the connection may carry another request after this one
    headers_complete = False
    dispatched = False      # handed to a task (before completion for 100-continue)
    version = '1.1'
    command = ''
    uri = ''
    path = ''
    query = None
    first_line = '-'
    request_line = None
    proxy_scheme = proxy_netloc = None
    _line = b''             # the request line's bytes while they arrive, then None
    _tail = b''             # the last bytes of the previous read
    _url_size = _head_size = _fields = 0
    _method_refused = False  # by llhttp: the rest of the method decides the answer

    def __init__(self, adj):
        self.limits = adj.http
        self.started = time.monotonic()
        self.headers = {}
        self._url = []
        self._parser = httptools.HttpRequestParser(self)
        # RFC 9110 2.5: HTTP/1.x for x > 1 is served as 1.1 (llhttp refuses
        # it otherwise). Not lenient_spaces_after_chunk_size: it would allow
        # the BWS before a chunk extension, but also spaces with none after.
        self._parser.set_dangerous_leniencies(lenient_version=True)

    # -- zope.server's IStreamConsumer --

    def received(self, data):
        """Feed bytes; returns how many belong to this request."""
        if self.completed:
            return 0
        size = len(data)
        fed = 0
        while fed < size and not self.completed:
            fed = self._feed(data, fed)
        if self.completed:
            self._parser = None  # it holds our bound methods: no cycle left for the GC
        else:
            self._tail = (self._tail + data[-3:])[-3:]
        return fed

    def _feed(self, data, start):
        """Feed the piece of `data` that begins at `start`; returns its end.
        In the head, a piece ends before the byte that passes a limit: llhttp
        has read all the bytes before it, so the first fault in the bytes is
        the one answered, however they were split (a long line with a bad
        method or target was 414 at once, 400 a byte at a time)."""
        end = self._piece_end(data, start)
        in_body = self.headers_complete
        if not in_body:
            end = min(end, start + self._head_room())
        piece = data if end == len(data) and not start else memoryview(data)[start:end]
        try:
            if not in_body:
                self._count_head(piece)
            if self._method_refused:
                self._refuse_method()
            else:
                self._parser.feed_data(piece)
            if in_body and self.chunked:
                self._count_chunk_framing(len(piece))
        except RequestRefused as refused:
            self.refuse(refused)
        except httptools.HttpParserUpgrade:
            pass  # the message is complete; keep_alive is off for upgrades
        except httptools.HttpParserInvalidMethodError:
            self._method_refused = True
            self._refuse_method()
        except httptools.HttpParserError as error:
            cause = error.__context__
            if isinstance(cause, _Overrun):
                self.keep_alive = False  # where the next one begins is unknown: end here
                self._parser = None
                return len(data)
            self.refuse(cause if isinstance(cause, RequestRefused) else RequestRefused(400, str(error)))
        return end

    def _refuse_method(self):
        """Refuse the request llhttp refused the method of, once its bytes say how."""
        line = self._line if self._line is not None else self.request_line + b'\r\n'
        refused = unknown_method(line)
        if refused is not None:
            self.refuse(refused)

    def _head_room(self):
        """Bytes the head may still take before one passes a limit (at least
        1: the one that does)."""
        limits = self.limits
        room = limits.limit_request_header_size - self._head_size
        if self._line is not None:
            room = min(room, limits.limit_request_line - len(self._line))
        return max(room, 1)

    def _piece_end(self, data, start):
        """Where the piece starting at `start` must end: a message ends after a
        blank line (head, chunked body) or at the end of a Content-Length body."""
        if self._remaining:
            return min(len(data), start + self._remaining)
        if not start and self._tail:  # an end of head may straddle two reads
            straddle = (self._tail + data[:3]).find(END_OF_HEAD)
            if straddle >= 0:
                return straddle + 4 - len(self._tail)
        found = data.find(END_OF_HEAD, start - 3 if start > 3 else 0)
        return len(data) if found < 0 else found + 4

    def _count_head(self, piece):
        limits = self.limits
        self._head_size += len(piece)
        if self._head_size > limits.limit_request_header_size:
            raise RequestRefused(431, f'header section larger than {limits.limit_request_header_size} bytes')
        if self._line is None:
            return
        line = self._line + bytes(piece[:limits.limit_request_line + 16])
        # RFC 9112 2.2: empty lines (CRLF) before a request line may be
        # ignored. llhttp skips any CR and LF there, but a bare CR is
        # invalid and a proxy may take it, or a bare LF, for part of the line.
        line = line[EMPTY_LINES.match(line).end():]
        if line[:1] == b'\n' or line[:1] == b'\r' and len(line) > 1:
            raise RequestRefused(400, 'a bare CR or LF before the request line')
        self._line = line
        line, crlf, _ = line.partition(b'\r\n')
        if crlf:
            self._line = None
            self.request_line = line
        # A CR last may begin the CRLF: the line is that long only if it does not.
        if len(line) - (not crlf and line[-1:] == b'\r') > limits.limit_request_line:
            raise RequestRefused(414, f'request line longer than {limits.limit_request_line} bytes')

    def refuse(self, refused):
        """Answer `refused` instead of the application (or stop the body
        it reads); nothing more of this request is parsed or stored."""
        self.error = refused
        self.keep_alive = False
        self.close(refused)

    def close(self, error='the connection ended'):
        """Release what this request holds, however it ended: llhttp's
        parser, which holds our bound methods (a cycle that only a full
        collection would break, with the spool file in it), and the body's
        spool file. A task still reading the body gets OSError (`error`)."""
        self.completed = True
        self._parser = None
        if self._body is not None:
            self._body.close(error)

    # -- llhttp's callbacks --

    def on_message_begin(self):
        if self.completed:
            raise _Overrun()

    def on_url(self, piece):
        self._url.append(piece)
        self._url_size += len(piece)
        if self._url_size > self.limits.limit_request_line:
            raise RequestRefused(414, f'request target longer than {self.limits.limit_request_line} bytes')

    def on_header(self, name, value):
        limits = self.limits
        self._fields += 1
        if self._fields > limits.limit_request_fields:
            raise RequestRefused(431, f'more than {limits.limit_request_fields} header fields')
        if len(name) + len(value) > limits.limit_request_field_size:
            raise RequestRefused(431, f'a header field larger than {limits.limit_request_field_size} bytes')
        if b'_' in name or self.headers_complete:
            return  # a trailer field is never merged into the header fields (RFC 9110, 6.5.1)
        key = name.upper().replace(b'-', b'_').decode('ascii')
        value = value.strip(b' \t').decode('latin-1')
        headers = self.headers
        if key not in headers:
            headers[key] = value
        elif key == 'HOST':
            raise RequestRefused(400, 'more than one Host header field')
        else:
            headers[key] += ('; ' if key == 'COOKIE' else ', ') + value

    def on_headers_complete(self):
        parser = self._parser
        self.version = version = parser.get_http_version()
        if version != '1.1' and version != '1.0':
            self.version = '1.1'
            if version[:2] != '1.':
                raise RequestRefused(505, f'HTTP/{version}')
        method = parser.get_method()
        target = b''.join(self._url)
        line = b'%s %s HTTP/%s' % (method, target, version.encode())
        if line != self.request_line:
            raise RequestRefused(400, 'the request line is not method SP request-target SP HTTP-version')
        self.first_line = line.decode('latin-1')
        self.command = method.decode('ascii')
        self.uri = target.decode('latin-1')
        self._split_target(target)
        self._check_framing()
        self.keep_alive = parser.should_keep_alive() and not parser.should_upgrade()
        if self.keep_alive and 'CONNECTION' in self.headers:
            self.keep_alive = 'close' not in {
                token.strip().lower() for token in self.headers['CONNECTION'].split(',')}
        self.headers_complete = True

    def _split_target(self, target):
        path, query, scheme, authority = split_target(target, self.command)
        if scheme is not None:
            self.proxy_scheme = scheme
            self.proxy_netloc = self.headers['HOST'] = authority
        self.path = (unquote_to_bytes(path) if b'%' in path else path).decode('latin-1')
        self.query = query.decode('latin-1') if query else None

    def _check_framing(self):
        headers, limits = self.headers, self.limits
        if self.version == '1.1' and 'HOST' not in headers:
            raise RequestRefused(400, 'no Host header field')
        if not valid_host(headers.get('HOST', '')):
            raise RequestRefused(400, 'an invalid Host header field')
        coding = headers.get('TRANSFER_ENCODING')
        if coding is not None:
            if self.version == '1.0':
                raise RequestRefused(400, 'Transfer-Encoding in an HTTP/1.0 request')
            if coding.lower() != 'chunked':
                raise RequestRefused(501, 'a transfer coding other than chunked')
            self.chunked = True
        elif 'CONTENT_LENGTH' in headers:
            self.content_length = int(headers['CONTENT_LENGTH'])  # checked by llhttp
            if self.content_length > limits.max_request_body_size:
                raise RequestRefused(413, f'body larger than {limits.max_request_body_size} bytes')
            self._remaining = self.content_length
        if self._parser.should_upgrade() and (self.chunked or self.content_length):
            raise RequestRefused(400, 'a body in a request to upgrade or CONNECT')  # llhttp would not read it
        if self.chunked or self.content_length:
            self._expect_body()


def valid_host(value):
    """Whether `value` (str) is a Host field value of RFC 9112 3.2."""
    match = HOST.fullmatch(value)
    if match is None:
        return False
    literal = match['literal']
    if literal is None or literal[:1] in 'vV':
        return True
    try:
        ipaddress.IPv6Address(literal)
    except ValueError:
        return False
    return True


class Body:
    """A request body, spooled to a temporary file beyond 512 KiB.

    Without 100-continue the task gets it complete (`stream()` is the file,
    at its start). With 100-continue the task gets it while it arrives:
    `stream()` is then a reader that waits for the bytes it is asked for.
    """

    SPOOL = 1 << 19
    on_first_read = None

    def __init__(self, streamed, limits):
        self.file = tempfile.SpooledTemporaryFile(max_size=self.SPOOL)
        self.streamed = streamed
        self.started = time.monotonic()
        self.grace, self.min_rate = limits.request_read_timeout, limits.request_body_min_rate
        self.written = 0
        self.read_at = 0
        self.finished = False
        self.error = None
        self.changed = threading.Condition() if streamed else None

    def deadline(self):
        """When the body must be complete, as far as it came (time.monotonic()):
        request_read_timeout, plus a second per request_body_min_rate bytes
        received (mod_reqtimeout's MinRate)."""
        return self.started + self.grace + self.written / self.min_rate

    def append(self, data):
        if not self.streamed:
            self.file.write(data)
            self.written += len(data)
            return
        with self.changed:
            self.file.seek(0, 2)
            self.file.write(data)
            self.written += len(data)
            self.changed.notify_all()

    def finish(self):
        if not self.streamed:
            self.file.seek(0)
            return
        with self.changed:
            self.finished = True
            self.changed.notify_all()

    def fail(self, error):
        if self.streamed:
            with self.changed:
                self.error = self.error or error
                self.changed.notify_all()

    def close(self, error):
        """Close the spool file; a reader of the body gets `error`."""
        if not self.streamed:
            self._close_file()
            return
        with self.changed:  # not while a reader is in the file
            self.error = self.error or error
            self.changed.notify_all()
            self._close_file()

    def _close_file(self):
        try:
            self.file.close()
        except OSError:
            pass  # its last buffered bytes did not fit on the disk: nobody reads them now

    def stream(self):
        return StreamedBody(self) if self.streamed else self.file

    def read(self, size, line=False):
        """Up to `size` bytes (all if negative; up to a newline if `line`),
        waiting for them; b'' at the end of the body."""
        if self.on_first_read is not None:
            callback, self.on_first_read = self.on_first_read(), None
            if callback is not None:
                callback()
        with self.changed:
            while True:
                available = self.written - self.read_at
                if self.error is not None:
                    late = getattr(self.error, 'status', None) == 408
                    raise (RequestBodyTimeout if late else OSError)(f'the request body was not received: {self.error}')
                if self.finished or (size >= 0 and available >= size) or (
                        line and self._newline_within(available)):
                    break
                late = self.deadline() - time.monotonic()
                if late <= 0:
                    raise RequestBodyTimeout(f'the request body arrived slower than {self.min_rate} bytes/s')
                self.changed.wait(late)
            self.file.seek(self.read_at)
            data = self.file.readline(size) if line else self.file.read(size)
            self.read_at += len(data)
            return data

    def _newline_within(self, available):
        self.file.seek(self.read_at)
        return b'\n' in self.file.read(available)


class StreamedBody:
    """wsgi.input of a request answered with 100 Continue (PEP 3333's input)."""

    def __init__(self, body):
        self.body = body

    def read(self, size=-1):
        return self.body.read(-1 if size is None else size)

    def readline(self, size=-1):
        return self.body.read(-1 if size is None else size, line=True)

    def readlines(self, hint=-1):
        return list(iter(self.readline, b''))

    def __iter__(self):
        return iter(self.readline, b'')
