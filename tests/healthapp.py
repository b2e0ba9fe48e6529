"""A WSGI application whose health can be turned off and on (``use =
call:healthapp:factory``, with this directory on the server's PYTHONPATH):
/healthz answers 500 while the file named by $HEALTHAPP_FLAG exists, 200
otherwise; every other path says hello."""
import os


def factory(global_config, **local_config):
    flag = os.environ['HEALTHAPP_FLAG']

    def app(environ, start_response):
        if environ['PATH_INFO'] == '/healthz' and os.path.exists(flag):
            body, status = b'unhealthy\n', '500 Internal Server Error'
        else:
            body, status = b'ok\n', '200 OK'
        start_response(status, [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])
        return [body]
    return app
