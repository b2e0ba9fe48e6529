"""The WSGI application tests/test_http_strict.py serves (``use =
call:echoapp:factory``, with this directory on the server's PYTHONPATH).

Every call is recorded, before anything else, as one JSON line appended to
the file named by $ECHOAPP_LOG: the method, path, query, every HTTP_* entry,
CONTENT_LENGTH, CONTENT_TYPE, and the body the application read. A smuggled
request therefore shows in the log even when its response is lost.

Routes:
  /noread           answers without reading the body
  /slow?ms=N        reads the body, then sleeps N ms
  /bad-header?part=name|value|status&char=cr|lf|nul
                    a response header (or status) with that character in it
  /respond?status=S&name=N&value=V[&name2=N2&value2=V2]&body=B   (percent-decoded)
                    answers status S with header N: V (and N2: V2), then B
  anything else     reads the body, answers with the record as JSON
"""
import json
import os
import time
from urllib.parse import unquote

CHARS = {'cr': '\r', 'lf': '\n', 'nul': '\0'}


def record(entry):
    line = json.dumps(entry) + '\n'
    with open(os.environ['ECHOAPP_LOG'], 'a') as file:
        file.write(line)


def query(environ):
    return dict(part.partition('=')[::2] for part in environ.get('QUERY_STRING', '').split('&') if part)


def app(environ, start_response):
    path = environ['PATH_INFO']
    entry = {key: value for key, value in environ.items()
             if key.startswith('HTTP_') or key in (
                 'REQUEST_METHOD', 'PATH_INFO', 'QUERY_STRING', 'CONTENT_LENGTH', 'CONTENT_TYPE',
                 'SERVER_PROTOCOL', 'wsgi.input_terminated')}
    if path != '/noread':
        body = environ['wsgi.input'].read()
        entry['body'] = body.decode('latin-1')
    record(entry)
    args = query(environ)
    if path == '/slow':
        time.sleep(int(args.get('ms', '0')) / 1000)
    if path == '/bad-header':
        char = CHARS[args['char']]
        part = args['part']
        headers = [('Content-Type', 'text/plain'), ('Content-Length', '2')]
        if part == 'status':
            start_response(f'200 OK{char}X-Injected: yes', headers)
        else:
            name, value = ('X-Bad' + char + 'Injected', 'x') if part == 'name' else ('X-Bad', 'a' + char + 'X-Injected: yes')
            start_response('200 OK', headers + [(name, value)])
        return [b'ok']
    if path == '/respond':
        fields = {key: unquote(value) for key, value in args.items()}
        headers = [(fields['name'], fields['value'])]
        if 'name2' in fields:
            headers.append((fields['name2'], fields['value2']))
        start_response(fields['status'], headers)
        return [fields.get('body', '').encode('latin-1')]
    out = json.dumps(entry).encode()
    start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(out)))])
    return [out]


def factory(global_conf, **local_conf):
    return app
