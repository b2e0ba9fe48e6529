"""The `zkprefork` command."""
from zkprefork.master import signalqueue

signalqueue.hold()  # first: a signal before the master's queue takes it would kill it

import argparse  # noqa: E402 (after hold: importing takes a tenth of a second or more)
import os  # noqa: E402
import sys  # noqa: E402

import zkprefork  # noqa: E402
from zkprefork import inifile, settings  # noqa: E402
from zkprefork.master import launch  # noqa: E402


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line and status 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f'zkprefork: error: {message} (see zkprefork --help)\n')


def _parser():
    parser = _OneLineParser(
        prog='zkprefork',
        description='Serve the WSGI application of a PasteDeploy ini file on N prefork '
                    'zope.server workers, registered in ZooKeeper. Options given here '
                    'override those of the ini file\'s server section.')
    parser.add_argument('config', help='the PasteDeploy ini file')
    parser.add_argument('--version', action='version', version=f'zkprefork {zkprefork.__version__}')
    add = parser.add_argument
    for field in settings.COMMAND_LINE:
        metavar, text = field.metadata['flag']
        shown = '' if field.default is None else f' (default {field.default!r})'
        # gunicorn's spelling: --ca-certs for ca_certs
        add(f'--{field.name.replace("_", "-")}', dest=field.name, metavar=metavar, help=text + shown)
    add('--server-name', metavar='NAME', help='the [server:NAME] section to read (default main)')
    add('--app-name', metavar='NAME', default='main', help='the [app:NAME] section to serve (default main)')
    return parser


def settings_from(args):
    config_file = os.path.abspath(args.config)
    options = inifile.read_options(config_file, app_name=args.app_name,
                                   server_name=args.server_name or 'main',
                                   server_required=args.server_name is not None)
    options.update({field.name: getattr(args, field.name) for field in settings.COMMAND_LINE
                    if getattr(args, field.name) is not None})
    return settings.make_settings(options, config_file=config_file, app_name=args.app_name)


def main(argv=None):
    args = _parser().parse_args(argv)
    return launch.start(lambda: settings_from(args))


if __name__ == '__main__':
    sys.exit(main())
