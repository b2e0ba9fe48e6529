"""The error every check raises: its own module, so that settings and the
checks it calls (tls.py) can share it without importing each other."""


class ConfigError(Exception):
    """A bad option or file: reported as one line, exit status 2."""
