"""Flask, Django and Pyramid apps with the same routes (bench/frameworks/compare.py serves them):
/upload (POST: what the framework read), /events (3 server-sent events 1 s apart), /endless (an
endless stream whose close() is noted), /file (a 50 MiB file through the framework's send_file),
/nocontent (204). $FRAMEWORKS_DIR holds big.bin and closed.log."""
import os, time
BIG = os.path.join(os.environ['FRAMEWORKS_DIR'], 'big.bin')
LOG = os.path.join(os.environ['FRAMEWORKS_DIR'], 'closed.log')

def note(text):
    with open(LOG, 'a') as f: f.write(text + '\n')

class Stream:
    def __init__(self, name): self.name = name
    def __iter__(self):
        while True:
            yield b'data: tick\n\n'; time.sleep(0.1)
    def close(self): note('closed ' + self.name)

# Flask
import flask
flask_app = flask.Flask('f')
@flask_app.route('/upload', methods=['POST'])
def f_upload():
    data = flask.request.get_data()
    files = {k: len(v.read()) for k, v in flask.request.files.items()}
    return {'len': len(data), 'files': files, 'form': dict(flask.request.form)}
@flask_app.route('/events')
def f_events():
    def gen():
        for i in range(3):
            yield f'data: {i} {time.time():.2f}\n\n'
            time.sleep(1)
    return flask.Response(gen(), mimetype='text/event-stream')
@flask_app.route('/endless')
def f_endless():
    return flask.Response(Stream('flask'), mimetype='text/event-stream')
@flask_app.route('/file')
def f_file():
    return flask.send_file(BIG)
@flask_app.route('/nocontent')
def f_nocontent():
    return '', 204

# Django
import django
from django.conf import settings
settings.configure(DEBUG=False, ROOT_URLCONF=__name__, ALLOWED_HOSTS=['*'], SECRET_KEY='x',
                   MIDDLEWARE=[], DATA_UPLOAD_MAX_MEMORY_SIZE=None)
django.setup()
from django.http import JsonResponse, StreamingHttpResponse, FileResponse, HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
@csrf_exempt
def d_upload(request):
    files = {k: len(v.read()) for k, v in request.FILES.items()}
    return JsonResponse({'len': len(request.body) if not files else -1, 'files': files, 'form': dict(request.POST.items())})
def d_events(request):
    def gen():
        for i in range(3):
            yield f'data: {i} {time.time():.2f}\n\n'
            time.sleep(1)
    return StreamingHttpResponse(gen(), content_type='text/event-stream')
def d_endless(request):
    return StreamingHttpResponse(Stream('django'), content_type='text/event-stream')
def d_file(request):
    return FileResponse(open(BIG, 'rb'))
def d_nocontent(request):
    return HttpResponse(status=204)
urlpatterns = [path('upload', d_upload), path('events', d_events), path('endless', d_endless),
               path('file', d_file), path('nocontent', d_nocontent)]
from django.core.wsgi import get_wsgi_application
django_app = get_wsgi_application()

# Pyramid
from pyramid.config import Configurator
from pyramid.response import Response, FileResponse as PFileResponse
def p_upload(request):
    files = {k: len(v.file.read()) for k, v in request.POST.items() if hasattr(v, 'file')}
    return {'len': len(request.body), 'files': files}
def p_events(request):
    def gen():
        for i in range(3):
            yield f'data: {i} {time.time():.2f}\n\n'.encode()
            time.sleep(1)
    return Response(app_iter=gen(), content_type='text/event-stream')
def p_endless(request):
    return Response(app_iter=Stream('pyramid'), content_type='text/event-stream')
def p_file(request):
    return PFileResponse(BIG, request=request)
def p_nocontent(request):
    return Response(status=204)
with Configurator() as config:
    for name, view, renderer in (('upload', p_upload, 'json'), ('events', p_events, None), ('endless', p_endless, None),
                                 ('file', p_file, None), ('nocontent', p_nocontent, None)):
        config.add_route(name, '/' + name)
        config.add_view(view, route_name=name, renderer=renderer)
    pyramid_app = config.make_wsgi_app()

def make(global_conf, which='flask', **kw):
    return {'flask': flask_app, 'django': django_app, 'pyramid': pyramid_app}[which]
