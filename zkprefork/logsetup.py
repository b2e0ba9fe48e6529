"""The `loggers` option: a level name, or a ZConfig logger definition."""
import logging
import sys

from zkprefork.errors import ConfigError

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
    for handler in _handlers():
        if not isinstance(handler.handleError, ErrorsOnce):
            handler.handleError = ErrorsOnce(handler)


def _configure_access_log(target):
    access = logging.getLogger('zkprefork.access')
    access.propagate = False  # its lines are the log format, not log records
    access.setLevel(logging.INFO)
    for handler in list(access.handlers):
        access.removeHandler(handler)
        handler.close()
    try:
        handler = logging.StreamHandler(sys.stdout) if target == '-' else logging.FileHandler(target)
    except OSError as error:
        # A directory, or a file that takes no appending (/proc/version):
        # settings' check cannot tell without opening it.
        raise ConfigError(f'access_log: cannot open {target!r}: {error.strerror}') from None
    handler.setFormatter(logging.Formatter('%(message)s'))
    access.addHandler(handler)


def _handlers():
    loggers = [logging.getLogger()] + [
        logger for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)]
    return {handler for logger in loggers for handler in logger.handlers}


class ErrorsOnce:
    """A handler's handleError that reports a failure to write (a full disk)
    in one line on standard error, once per kind of error until a record
    is written again. logging's own prints a traceback per failed record:
    on a full disk, one per request.

    It learns that a record was written by wrapping the handler's emit
    (handleError is called from within emit, under the handler's lock)."""

    def __init__(self, handler):
        self.handler, self.emit = handler, handler.emit
        self.reported = set()  # (exception class, errno) since the last record written
        self.failed = False
        handler.emit = self._emit

    def _emit(self, record):
        self.failed = False
        self.emit(record)
        if self.reported and not self.failed:
            self.reported.clear()
            _tell(logging.INFO, f'log records are written to {self.where()} again')

    def __call__(self, record):
        self.failed = True
        error = sys.exc_info()[1]
        kind = (type(error), getattr(error, 'errno', None))
        if kind not in self.reported:
            self.reported.add(kind)
            _tell(logging.ERROR, f'cannot write log records to {self.where()}: {error!r} '
                                 '(reported once, until one is written again)')

    def where(self):
        handler = self.handler
        return getattr(handler, 'baseFilename', None) or getattr(
            getattr(handler, 'stream', None), 'name', None) or repr(handler)


def _tell(level, message):
    """A line on standard error, where logging reports its own errors."""
    record = logging.LogRecord('zkprefork.logsetup', level, __file__, 0, message, None, None)
    try:
        sys.stderr.write(logging.Formatter(FORMAT).format(record) + '\n')
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # standard error is on the full disk too: nowhere left to say it


def reopen():
    """Reopen every log file (SIGUSR1, after logrotate moved them)."""
    for handler in _handlers():
        if hasattr(handler, 'reopen'):  # ZConfig's file handler
            handler.reopen()
        elif isinstance(handler, logging.FileHandler):
            old = handler.setStream(handler._open())
            if old is not None:
                old.close()
