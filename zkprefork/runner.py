"""The PasteDeploy server runner: ``use = egg:zkprefork`` in a [server:...]
section, for pserve, ``paste.deploy.loadserver`` and the zkprefork command.

The caller has already loaded the application, so the workers serve that
object (inherited through fork, as with preload) instead of loading it anew.
"""
import sys

from zkprefork.master import launch
from zkprefork.settings import make_settings


def run(wsgi_app, global_conf, **local_conf):
    status = launch.start(
        lambda: make_settings(local_conf, config_file=global_conf.get('__file__')),
        app=wsgi_app)
    if status:
        sys.exit(status)
