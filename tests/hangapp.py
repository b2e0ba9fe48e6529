"""A WSGI application whose /healthz hangs while the file named by
$HANGAPP_FLAG exists (up to 30 s, answering 200 once the file goes);
every other path says hello at once (``use = call:hangapp:factory``)."""
import os
import time


def factory(global_config, **local_config):
    flag = os.environ['HANGAPP_FLAG']

    def app(environ, start_response):
        if environ['PATH_INFO'] == '/healthz':
            deadline = time.monotonic() + 30
            while os.path.exists(flag) and time.monotonic() < deadline:
                time.sleep(0.05)
        body = b'ok\n'
        start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])
        return [body]
    return app
