"""The parts of PEP 3333 that are not about zope.server's channels: start_response,
wsgi.file_wrapper, the trust in a proxy's X-Forwarded-* fields
(forwarded_allow_ips), and the Date header's value.

A task, for start_response, is zope.server's HTTPTask interface:
wroteResponseHeader(), setResponseStatus(), appendResponseHeaders(),
accumulated_headers, response_headers, write().
"""
import ipaddress
import re

from zope.server.http.http_date import build_http_date

# RFC 9110, 5.6.2: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# RFC 9110, 5.5: no control character in a field value but HTAB (CR, LF and
# NUL above all: they would split the response).
_CONTROL = re.compile(r'[\x00-\x08\x0a-\x1f\x7f]')
# Hop-by-hop fields are the server's to send (PEP 3333): an application's
# Transfer-Encoding, above all, would frame the body a second way.
HOP_BY_HOP = frozenset(('transfer-encoding', 'te', 'trailer', 'upgrade', 'keep-alive',
                        'proxy-authenticate', 'proxy-authorization'))


def check_header_text(text):
    """A status line or a field value: ValueError if it holds a control character."""
    if _CONTROL.search(text):
        raise ValueError(f'a control character (CR, LF, NUL...) in a response header or status: {text!r}')


def check_header(name, value):
    """One of the application's response fields, as PEP 3333 and RFC 9110
    allow it; ValueError (the application's error, a 500) otherwise."""
    if type(name) is not str or type(value) is not str:
        raise TypeError(f'a response header is not a pair of str: {(name, value)!r}')
    if not _TOKEN.match(name):
        raise ValueError(f'not a header field name: {name!r}')
    if name.lower() in HOP_BY_HOP:
        raise ValueError(f'a WSGI application must not set the hop-by-hop field {name!r} (PEP 3333)')
    if name.lower() == 'content-length' and not (value.strip().isascii() and value.strip().isdigit()):
        raise ValueError(f'not a Content-Length: {value!r}')
    check_header_text(value)


NO_BODY = ('204', '304')  # statuses framed without a body (RFC 9110, 6.4.1)


def valid_status(code):
    """Whether an application may send the status `code` (str): three ASCII
    digits (str.isdigit() also takes '²'), 200 to 599. 1xx are interim
    responses (the server sends 100 Continue itself), and RFC 9110 15
    defines no class beyond 5xx: a proxy may refuse the response (HAProxy
    answers 502 to non-ASCII digits)."""
    return len(code) == 3 and code.isascii() and code.isdigit() and '200' <= code <= '599'


_date = [None, '']  # the second and its IMF-fixdate, cached: one response after another asks


def http_date(when):
    second = int(when)
    if second != _date[0]:
        _date[:] = second, build_http_date(second)
    return _date[1]


def start_response_for(task):
    """PEP 3333's start_response for `task`. A status or header that holds
    CR, LF or NUL is the application's error (ValueError), never sent."""
    def start_response(status, headers, exc_info=None):
        if exc_info:
            try:
                if task.wroteResponseHeader():
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif task.accumulated_headers is not None:
            raise AssertionError('start_response called a second time without exc_info')
        code, _, reason = status.partition(' ')
        if not valid_status(code):
            raise ValueError(f'not an HTTP status a WSGI application may send: {status!r}')
        lines = []
        length = None
        for name, value in headers:
            check_header(name, value)
            if name.lower() == 'content-length':
                if length is not None:
                    if int(value) != length:
                        raise ValueError(f'Content-Length fields that disagree: {length} and {value.strip()}')
                    # RFC 9110 8.6 lets a recipient fold equal ones, but a
                    # proxy may as well refuse the response (and llhttp does).
                    continue
                length = int(value)
            lines.append(f'{name}: {value}')
        task.setResponseStatus(code, reason)
        task.accumulated_headers = None
        task.response_headers = {}
        task.appendResponseHeaders(lines)
        return write

    def write(data):
        if not isinstance(data, bytes):
            raise TypeError(f'write() takes bytes, not {type(data).__name__}')
        task.write(data)
    return start_response


class FileWrapper:
    """wsgi.file_wrapper (PEP 3333): a regular file is sent with os.sendfile,
    anything else read in blocks."""

    def __init__(self, file, block_size=8192):
        self.file = file
        self.block_size = block_size
        if hasattr(file, 'close'):
            self.close = file.close

    def __iter__(self):
        return iter(lambda: self.file.read(self.block_size), b'')


class ForwardedPeers:
    """forwarded_allow_ips (gunicorn's meaning): from these peers,
    X-Forwarded-Proto sets wsgi.url_scheme and the last address of
    X-Forwarded-For (the one the proxy added) REMOTE_ADDR."""

    def __init__(self, allowed):
        """`allowed`: network strings (settings' forwarded_allow_ips), or ('*',)."""
        self.networks = None if allowed == ('*',) else [ipaddress.ip_network(item) for item in allowed]

    def trusts(self, address):
        if self.networks is None:
            return True
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return False
        peer = getattr(peer, 'ipv4_mapped', None) or peer  # ::ffff:a.b.c.d on a dual-stack socket
        return any(peer in network for network in self.networks)

    def apply(self, env):
        if ('HTTP_X_FORWARDED_FOR' not in env and 'HTTP_X_FORWARDED_PROTO' not in env
                or not self.trusts(env['REMOTE_ADDR'])):
            return
        forwarded_for = env.get('HTTP_X_FORWARDED_FOR', '').rpartition(',')[2].strip()
        if forwarded_for:
            env['REMOTE_ADDR'] = forwarded_for
        scheme = env.get('HTTP_X_FORWARDED_PROTO', '').strip().lower()
        if scheme in ('http', 'https'):
            env['wsgi.url_scheme'] = scheme
