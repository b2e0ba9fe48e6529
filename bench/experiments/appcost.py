"""The CPU each real application costs per call, in process, with no server:
the floor under every server's CPU per request (bench/realapps.py).

    python3 bench/experiments/appcost.py

Each route is called 300 times to warm up, then 5 x 1000 times; prints the
best run's CPU µs per call (process time) and what that bounds a server at
on this machine's cores.
"""
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import realapps  # noqa: E402


def environ(path):
    return {'REQUEST_METHOD': 'GET', 'PATH_INFO': path, 'SCRIPT_NAME': '', 'QUERY_STRING': '',
            'SERVER_NAME': '127.0.0.1', 'SERVER_PORT': '8000', 'SERVER_PROTOCOL': 'HTTP/1.1',
            'HTTP_HOST': '127.0.0.1:8000', 'wsgi.url_scheme': 'http', 'wsgi.input': io.BytesIO(),
            'wsgi.errors': sys.stderr, 'wsgi.version': (1, 0), 'wsgi.multithread': True,
            'wsgi.multiprocess': True, 'wsgi.run_once': False, 'REMOTE_ADDR': '127.0.0.1'}


def call(path):
    body = realapps.app(environ(path), lambda status, headers, exc_info=None: None)
    b''.join(body)
    getattr(body, 'close', lambda: None)()


def cost(path, runs=5, calls=1000):
    """The best of `runs` runs' CPU µs per call."""
    for _ in range(300):
        call(path)
    best = float('inf')
    for _ in range(runs):
        started = time.process_time()
        for _ in range(calls):
            call(path)
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


def main():
    cores = os.cpu_count() or 1
    for path in ('/page', '/api', '/django'):
        us = cost(path)
        print(f'{path:8} {us:7.0f} µs CPU per call; {cores} cores bound a server at {cores * 1e6 / us:6.0f} req/s')


if __name__ == '__main__':
    main()
