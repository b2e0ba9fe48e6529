"""The PasteDeploy ini file: the server section's options and the application.

Reading options never loads the application: the master must not run
application code, only workers do (after fork).
"""
import configparser
import os

from paste.deploy import loadapp
from paste.deploy.loadwsgi import APP, SERVER, ConfigLoader

from zkprefork.settings import ConfigError


def _loader(config_file):
    try:
        return ConfigLoader(config_file)
    except OSError as error:
        raise ConfigError(f'config: cannot read {config_file!r}: {error.strerror}') from None
    except (configparser.Error, UnicodeDecodeError) as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f'config: {config_file!r} is not a valid ini file: {first_line}') from None


def _section(loader, object_type, name, what, required=True):
    """The section's name; None for a missing one that is not required."""
    try:
        return loader.find_config_section(object_type, name=name)
    except LookupError:
        if not required:
            return None
        raise ConfigError(
            f'{what}: no [{what}:{name}] section in {loader.filename!r}') from None


def read_options(config_file, app_name='main', server_name='main', server_required=False):
    """Return the server section's options as strings, after checking that the
    application section exists.

    A missing server section is an error only when it was asked for by name:
    ``zkprefork app.ini --port 8080`` needs no ``[server:main]``.
    """
    loader = _loader(config_file)
    _section(loader, APP, app_name, 'app')
    section = _section(loader, SERVER, server_name, 'server', server_required)
    if section is None:
        return {}
    parser = loader.parser
    defaults = parser.defaults()
    try:
        return {option: parser.get(section, option) for option in parser.options(section)
                if option not in defaults and option != 'use'}
    except configparser.Error as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f'config: [{section}]: {first_line}') from None


def load_app(config_file, app_name):
    """Load the WSGI application: only ever called in a worker (or with preload)."""
    return loadapp('config:' + os.path.abspath(config_file), name=app_name)
