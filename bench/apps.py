"""The WSGI applications every server in the benchmark serves.

`hello`  -- hello world, with Content-Length (so HTTP/1.1 keep-alive works).
`sleep10` -- blocks 10 ms per request in time.sleep (an app waiting on I/O).
`app`    -- both in one callable, the one the servers are started with:
            /sleep10 -> sleep10, anything else -> hello.  One server process
            per server kind then serves both loads of a round.  For
            bench/experiments/check.py it also answers /big (1 MiB),
            /echo (the request body) and /sleep?ms=N (with the worker's pid
            in X-Worker-Pid).

`make_app` is a PasteDeploy app factory (``use = call:apps:make_app``) for
zkprefork; gunicorn and waitress take ``apps:app``.
"""
import os
import time

HELLO = b'Hello, World!\n'
HELLO_HEADERS = [('Content-Type', 'text/plain'), ('Content-Length', str(len(HELLO)))]


def hello(environ, start_response):
    start_response('200 OK', HELLO_HEADERS)
    return [HELLO]


def sleep10(environ, start_response):
    time.sleep(0.010)
    start_response('200 OK', HELLO_HEADERS)
    return [HELLO]


BIG = bytes(range(256)) * 4096


def app(environ, start_response):
    path = environ.get('PATH_INFO')
    if path == '/':
        return hello(environ, start_response)
    if path == '/sleep10':
        return sleep10(environ, start_response)
    if path == '/big':
        start_response('200 OK', [('Content-Type', 'application/octet-stream'), ('Content-Length', str(len(BIG)))])
        return [BIG]
    if path == '/echo':
        body = environ['wsgi.input'].read(int(environ.get('CONTENT_LENGTH') or 0))
        start_response('200 OK', [('Content-Type', 'application/octet-stream'), ('Content-Length', str(len(body)))])
        return [body]
    if path == '/sleep':
        time.sleep(int(environ.get('QUERY_STRING', 'ms=0').partition('=')[2] or 0) / 1000)
        start_response('200 OK', HELLO_HEADERS + [('X-Worker-Pid', str(os.getpid()))])
        return [HELLO]
    return hello(environ, start_response)


def make_app(global_conf, **local_conf):
    return app
