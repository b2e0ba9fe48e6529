"""The demo application served by etc/demo.ini (``egg:zkprefork#demo``).

/            a greeting with the worker's pid
/sleep?s=N   answers after N seconds (to watch graceful stops and reloads)
/environ     the WSGI environ as JSON
"""
import json
import os
import time
import urllib.parse


def make_app(global_conf, greeting='Hello from zkprefork'):
    def app(environ, start_response):
        path = environ.get('PATH_INFO', '/')
        query = urllib.parse.parse_qs(environ.get('QUERY_STRING', ''))
        if path == '/sleep':
            time.sleep(float(query.get('s', ['1'])[0]))
        if path == '/environ':
            body = json.dumps({k: v for k, v in environ.items() if isinstance(v, str)}).encode()
            content_type = 'application/json'
        else:
            body = f'{greeting} (pid {os.getpid()})\n'.encode()
            content_type = 'text/plain; charset=utf-8'
        start_response('200 OK', [('Content-Type', content_type),
                                  ('Content-Length', str(len(body)))])
        return [body]
    return app
