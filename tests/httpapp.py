"""The WSGI application tests/test_http.py serves (``use = call:httpapp:factory``,
with this directory on the server's PYTHONPATH).

Routes (GET unless said otherwise):

  /                 hello world, with Content-Length
  /sleep?ms=N       hello world after N ms in time.sleep
  /pid              the worker's pid
  /say?text=X&ms=N  X (after N ms), to tell pipelined responses apart
  /big?n=N&ms=M     after M ms, N bytes (default 2 MiB) of a known pattern,
                    with Content-Length
  /echo             (POST) the request body
  /headers          the request's HTTP_* environ entries, as JSON
  /chunks           several chunks from a generator, with Content-Length
  /chunks-nolength  the same chunks, without Content-Length (so: until close)
  /closing?id=X&size=N&ms=M
                    after M ms, an iterable of N bytes or more whose close()
                    appends X to the file named by $HTTPAPP_CLOSE_LOG
  /raise            raises before start_response
  /raise-late       starts a response of Content-Length 100, yields 7 bytes,
                    then raises
  /head             Content-Length of the GET body; no body for HEAD
  /status?code=N    a response with status N (204, 304): no body, no Content-Length
"""
import json
import os
import time

HELLO = b'Hello, World!\n'
CHUNKS = [b'first chunk\n', b'', b'second chunk, a bit longer\n', b'x' * 10000, b'last\n']
HEAD_BODY = b'the body a GET would get\n' * 10


def big(size):
    pattern = bytes(range(256))
    return (pattern * (size // 256 + 1))[:size]


def query(environ):
    return dict(part.partition('=')[::2] for part in environ.get('QUERY_STRING', '').split('&') if part)


def respond(start_response, body, status='200 OK', content_type='text/plain'):
    start_response(status, [('Content-Type', content_type), ('Content-Length', str(len(body)))])
    return [body]


class Closing:
    """An app iterable whose close() is recorded in a file."""

    def __init__(self, token, size=0):
        self.token = token
        self.chunks = [b'closing ', token.encode(), b'\n']
        if size:
            self.chunks.append(big(size))

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        path = os.environ['HTTPAPP_CLOSE_LOG']
        with open(path, 'a') as file:
            file.write(f'{self.token}\n')


def generate_chunks():
    yield from CHUNKS


def raise_late(start_response):
    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', '100')])
    yield b'partial'
    raise RuntimeError('httpapp: failing in the middle of the body')


def app(environ, start_response):
    path = environ.get('PATH_INFO')
    args = query(environ)
    if path == '/':
        return respond(start_response, HELLO)
    if path == '/sleep':
        time.sleep(int(args.get('ms', '0')) / 1000)
        return respond(start_response, HELLO)
    if path == '/say':
        time.sleep(int(args.get('ms', '0')) / 1000)
        return respond(start_response, args.get('text', '').encode())
    if path == '/pid':
        return respond(start_response, str(os.getpid()).encode())
    if path == '/big':
        time.sleep(int(args.get('ms', '0')) / 1000)
        size = int(args.get('n', 2 * 1024 * 1024))
        return respond(start_response, big(size), content_type='application/octet-stream')
    if path == '/echo':
        body = environ['wsgi.input'].read(int(environ.get('CONTENT_LENGTH') or 0))
        return respond(start_response, body, content_type='application/octet-stream')
    if path == '/headers':
        headers = {key: value for key, value in environ.items() if key.startswith('HTTP_')}
        return respond(start_response, json.dumps(headers).encode(), content_type='application/json')
    if path == '/chunks':
        length = sum(len(chunk) for chunk in CHUNKS)
        start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(length))])
        return generate_chunks()
    if path == '/chunks-nolength':
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return generate_chunks()
    if path == '/closing':
        time.sleep(int(args.get('ms', '0')) / 1000)
        closing = Closing(args.get('id', ''), int(args.get('size', '0')))
        length = sum(len(chunk) for chunk in closing.chunks)
        start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(length))])
        return closing
    if path == '/raise':
        raise RuntimeError('httpapp: failing on purpose')
    if path == '/raise-late':
        return raise_late(start_response)
    if path == '/head':
        start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(HEAD_BODY)))])
        return [] if environ['REQUEST_METHOD'] == 'HEAD' else [HEAD_BODY]
    if path == '/status':
        code = int(args.get('code', '204'))
        reason = {204: 'No Content', 304: 'Not Modified'}.get(code, 'Whatever')
        start_response(f'{code} {reason}', [('X-Status', str(code))])
        return []
    return respond(start_response, b'not found\n', status='404 Not Found')


def factory(global_conf, **local_conf):
    return app
