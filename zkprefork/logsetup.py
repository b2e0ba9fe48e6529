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
