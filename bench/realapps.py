"""The real applications of the peer table (issue 22): what users run,
rather than hello world, served by every server the same way.

`/page`   -- Flask 3: a Jinja page of 50 rows (the template compiled once,
             at import, as a deployed app's template cache holds it).
`/api`    -- Flask 3: a JSON API answering 100 objects, built per request
             (as from a query) and serialised by Flask's JSON provider.
`/django` -- Django 5: a template view of the same 50 rows, through
             Django's cached template loader and two usual middlewares.
anything else -- bench/apps.py's `app` (hello world at `/`, `/sleep10`),
             so that one server process serves every load of a TLS round.

`app` is the callable every server is started with (``realapps:app``);
`make_app` the PasteDeploy factory for zkprefork (``call:realapps:make_app``).
Flask, Jinja2 and Django come with the `bench` extra.
"""
import django
import flask
from django.conf import settings

import apps

TITLE = 'Orders'
# The data a page shows: made once, as if from a cache, so that what is
# measured is the framework and the template, not the building of the rows.
ROWS = [{'id': i, 'name': f'Customer <{i}>', 'email': f'customer{i}@example.com', 'price': i * 3.25}
        for i in range(50)]

JINJA_PAGE = """<!doctype html>
<html><head><title>{{ title }}</title></head><body><h1>{{ title }}</h1><table>
{% for row in rows %}<tr class="{{ loop.cycle('odd', 'even') }}"><td>{{ row.id }}</td><td>{{ row.name }}</td>\
<td>{{ row.email }}</td><td>{{ '%.2f'|format(row.price) }}</td></tr>
{% endfor %}</table></body></html>
"""
DJANGO_PAGE = """<!doctype html>
<html><head><title>{{ title }}</title></head><body><h1>{{ title }}</h1><table>
{% for row in rows %}<tr class="{% cycle 'odd' 'even' %}"><td>{{ row.id }}</td><td>{{ row.name }}</td>\
<td>{{ row.email }}</td><td>{{ row.price|floatformat:2 }}</td></tr>
{% endfor %}</table></body></html>
"""

# -- Flask ---------------------------------------------------------------------

flask_app = flask.Flask(__name__)
PAGE = flask_app.jinja_env.from_string(JINJA_PAGE)  # compiled here, once per process


@flask_app.route('/page')
def page():
    return flask.render_template(PAGE, title=TITLE, rows=ROWS)


@flask_app.route('/api')
def api():
    return flask.jsonify([{'id': i, 'name': f'item {i}', 'price': round(i * 1.25, 2), 'in_stock': i % 3 != 0,
                           'tags': ['bench', f'group-{i % 5}']} for i in range(100)])


# -- Django --------------------------------------------------------------------

settings.configure(
    DEBUG=False, SECRET_KEY='bench-only, never a secret', ALLOWED_HOSTS=['*'], ROOT_URLCONF=__name__,
    USE_TZ=True, INSTALLED_APPS=[],
    MIDDLEWARE=['django.middleware.security.SecurityMiddleware', 'django.middleware.common.CommonMiddleware'],
    TEMPLATES=[{'BACKEND': 'django.template.backends.django.DjangoTemplates', 'OPTIONS': {
        # The cached loader (Django's default when DEBUG is off) keeps the compiled template.
        'loaders': [('django.template.loaders.cached.Loader',
                     [('django.template.loaders.locmem.Loader', {'page.html': DJANGO_PAGE})])]}}])
django.setup()

from django.shortcuts import render  # noqa: E402  (needs the settings above)
from django.urls import path  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402


def django_page(request):
    return render(request, 'page.html', {'title': TITLE, 'rows': ROWS})


urlpatterns = [path('django', django_page)]
django_app = get_wsgi_application()


# -- the one callable ------------------------------------------------------------

def app(environ, start_response):
    path_info = environ.get('PATH_INFO', '')
    if path_info in ('/page', '/api'):
        return flask_app(environ, start_response)
    if path_info == '/django':
        return django_app(environ, start_response)
    return apps.app(environ, start_response)


def make_app(global_conf, **local_conf):
    return app
