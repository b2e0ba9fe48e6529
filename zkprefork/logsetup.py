"""The `loggers` option: a level name, or a ZConfig logger definition."""
import logging
import sys

FORMAT = '%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s'


def configure(loggers):
    """`loggers` as checked by settings: None, an upper-case level name, or
    ZConfig text (with ``$$(`` already turned into ``%(``)."""
    if loggers is None or not loggers.startswith('<'):
        logging.basicConfig(level=loggers or 'INFO', format=FORMAT, stream=sys.stderr, force=True)
    else:
        import ZConfig
        ZConfig.configureLoggers(loggers)


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
