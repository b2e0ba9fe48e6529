"""The WSGI application tests/test_wsgi.py serves (``use = call:wsgiapp:factory``,
with this directory on the server's PYTHONPATH). Events (a generator's
close(), the blocks a generator has made) are appended as lines to the
file named by $WSGIAPP_LOG.

Routes:
  /endless?id=X&ms=N     an endless event stream, a piece every N ms; close() logs 'closed X'
  /generated?id=X&mb=N   N MiB in 64 KiB blocks, no Content-Length; each block logs 'block X',
                         close() 'closed X'
  /one-piece?mb=N        N MiB as one bytes object, with Content-Length
  /events?n=N&ms=M       N events M ms apart (server-sent events), no Content-Length
  /stream?n=N            N pieces, no Content-Length
  /raise-in-stream       two pieces, no Content-Length, then an exception
  /length?declared=D&sent=S  Content-Length D, S bytes sent
  /write                 the body through start_response's write(), then an iterable
  /header?value=V        a header X-Value whose value is V (percent-decoded, UTF-8)
  /file-like             a BytesIO through wsgi.file_wrapper, no Content-Length
  /file?path=P[&copy=1]  the file P through wsgi.file_wrapper (copy=1: read and yielded)
  .../env                the CGI part of the environ, as JSON (any path ending in /env)
  /echo                  the request body read up to CONTENT_LENGTH (or to its end
                         without one), as JSON with CONTENT_LENGTH and wsgi.input_terminated
  /status?code=N         a response with status N and no body
"""
import io
import json
import os
import time
from urllib.parse import unquote

PIECE = b'data: tick\n\n'


def log(line):
    with open(os.environ['WSGIAPP_LOG'], 'a') as file:
        file.write(line + '\n')


def query(environ):
    return dict(part.partition('=')[::2] for part in environ.get('QUERY_STRING', '').split('&') if part)


class Endless:
    def __init__(self, token, every):
        self.token, self.every = token, every

    def __iter__(self):
        while True:
            yield PIECE
            time.sleep(self.every)

    def close(self):
        log(f'closed {self.token}')


class Generated:
    def __init__(self, token, megabytes):
        self.token, self.megabytes = token, megabytes

    def __iter__(self):
        block = b'g' * 65536
        for _ in range(self.megabytes * 16):
            log(f'block {self.token}')
            yield block

    def close(self):
        log(f'closed {self.token}')


def events(count, every):
    for i in range(count):
        if i:
            time.sleep(every)
        yield f'data: {i} {time.time()}\n\n'.encode()


def raise_in_stream():
    yield b'first piece\n'
    yield b'second piece\n'
    raise RuntimeError('wsgiapp: failing in the middle of a stream')


def app(environ, start_response):
    path, args = environ['PATH_INFO'], query(environ)
    text = [('Content-Type', 'text/plain')]
    if path == '/endless':
        start_response('200 OK', [('Content-Type', 'text/event-stream')])
        return Endless(args['id'], int(args.get('ms', '50')) / 1000)
    if path == '/generated':
        start_response('200 OK', [('Content-Type', 'application/octet-stream')])
        return Generated(args['id'], int(args['mb']))
    if path == '/one-piece':
        body = b'o' * (int(args['mb']) << 20)
        start_response('200 OK', [('Content-Type', 'application/octet-stream'), ('Content-Length', str(len(body)))])
        return [body]
    if path == '/events':
        start_response('200 OK', [('Content-Type', 'text/event-stream')])
        return events(int(args['n']), int(args['ms']) / 1000)
    if path == '/stream':
        start_response('200 OK', text)
        return (b'piece %d\n' % i for i in range(int(args['n'])))
    if path == '/raise-in-stream':
        start_response('200 OK', text)
        return raise_in_stream()
    if path == '/length':
        start_response('200 OK', text + [('Content-Length', args['declared'])])
        return [b'x' * int(args['sent'])]
    if path == '/write':
        write = start_response('200 OK', text + [('Content-Length', '18')])
        write(b'written, ')
        return [b'returned\n']
    if path == '/header':
        start_response('200 OK', text + [('X-Value', unquote(args['value'])), ('Content-Length', '2')])
        return [b'ok']
    if path == '/file-like':  # no fileno(): read in blocks, and chunked without Content-Length
        start_response('200 OK', [('Content-Type', 'application/octet-stream')])
        return environ['wsgi.file_wrapper'](io.BytesIO(b'not a file ' * 1000), 100)
    if path == '/file':
        size = os.path.getsize(args['path'])
        start_response('200 OK', [('Content-Type', 'application/octet-stream'), ('Content-Length', str(size))])
        file = open(args['path'], 'rb')
        if args.get('copy'):
            return _read_blocks(file)
        return environ['wsgi.file_wrapper'](file, 65536)
    if path.endswith('/env'):
        body = json.dumps({key: value for key, value in environ.items() if isinstance(value, (str, bool))}).encode()
        start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])
        return [body]
    if path == '/echo':
        length = environ.get('CONTENT_LENGTH')
        data = environ['wsgi.input'].read(int(length)) if length else environ['wsgi.input'].read()
        body = json.dumps({'CONTENT_LENGTH': length, 'wsgi.input_terminated': environ.get('wsgi.input_terminated'),
                           'body': data.decode('latin-1')}).encode()
        start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])
        return [body]
    if path == '/status':
        start_response(f'{args["code"]} Whatever', [])
        return []
    start_response('404 Not Found', text + [('Content-Length', '0')])
    return []


def _read_blocks(file):
    with file:
        while block := file.read(65536):
            yield block


def factory(global_conf, **local_conf):
    return app
