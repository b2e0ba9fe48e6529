"""The parts of PEP 3333 that are not about zope.server's channels: start_response,
wsgi.file_wrapper, the trust in a proxy's X-Forwarded-* fields
(forwarded_allow_ips), and the Date header's value.

A task, for start_response, is zope.server's HTTPTask interface:
wroteResponseHeader(), setResponseStatus(), appendResponseHeaders(),
accumulated_headers, response_headers, write().
"""
import ipaddress

from zope.server.http.http_date import build_http_date


def check_header_text(text):
    if '\r' in text or '\n' in text or '\0' in text:
        raise ValueError(f'CR, LF or NUL in a response header or status: {text!r}')


NO_BODY = ('204', '304')  # statuses framed without a body (RFC 9110, 6.4.1)
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
        if not (len(code) == 3 and code.isdigit()):
            raise ValueError(f'not an HTTP status: {status!r}')
        lines = []
        for name, value in headers:
            if type(name) is not str or type(value) is not str:
                raise TypeError(f'a response header is not a pair of str: {(name, value)!r}')
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
