"""The `loggers` option: a level name, or a ZConfig logger definition."""
import logging
import sys

FORMAT = '%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s'


def configure(loggers, access_log=None):
    """`loggers` as checked by settings: None, an upper-case level name, or
    ZConfig text (with ``$$(`` already turned into ``%(``). `access_log`: a
    file for the `zkprefork.access` logger, or '-' for standard output.

    Done in the master, before fork: workers inherit the handlers."""
    if loggers is None or not loggers.startswith('<'):
        logging.basicConfig(level=loggers or 'INFO', format=FORMAT, stream=sys.stderr, force=True)
    else:
        import ZConfig
        try:
            ZConfig.configureLoggers(loggers)
        except OSError as error:
            from zkprefork.settings import ConfigError
            raise ConfigError(f'loggers: cannot open log file {error.filename!r}: {error.strerror}') from None
    if access_log:
        _configure_access_log(access_log)


def _configure_access_log(target):
    access = logging.getLogger('zkprefork.access')
    access.propagate = False  # its lines are the log format, not log records
    access.setLevel(logging.INFO)
    for handler in list(access.handlers):
        access.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stdout) if target == '-' else logging.FileHandler(target)
    handler.setFormatter(logging.Formatter('%(message)s'))
    access.addHandler(handler)


def reopen():
    """Reopen every log file (SIGUSR1, after logrotate moved them)."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)]
    for handler in {handler for logger in loggers for handler in logger.handlers}:
        if hasattr(handler, 'reopen'):  # ZConfig's file handler
            handler.reopen()
        elif isinstance(handler, logging.FileHandler):
            old = handler.setStream(handler._open())
            if old is not None:
                old.close()
