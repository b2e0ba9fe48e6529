"""The `zkprefork` command."""
import argparse
import os
import sys

import zkprefork
from zkprefork import inifile
from zkprefork.master import launch
from zkprefork.settings import make_settings


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
    add('--workers', metavar='N', help='number of worker processes (default 1)')
    add('--threads', metavar='N', help='threads per worker (default 1)')
    add('--host', metavar='H', help="address to listen on ('' = all interfaces, the default)")
    add('--port', metavar='P', help='port to listen on (default 0: the OS picks one)')
    add('--zookeeper', metavar='CONN', help='ZooKeeper connection string HOST:PORT[,...][/chroot]')
    add('--path', metavar='PATH', help='ZooKeeper path under which the server registers')
    add('--pidfile', metavar='FILE', help='write the master pid to FILE')
    add('--server-name', metavar='NAME', help='the [server:NAME] section to read (default main)')
    add('--app-name', metavar='NAME', default='main', help='the [app:NAME] section to serve (default main)')
    return parser


_OVERRIDES = ('workers', 'threads', 'host', 'port', 'zookeeper', 'path', 'pidfile')


def settings_from(args):
    config_file = os.path.abspath(args.config)
    options = inifile.read_options(config_file, app_name=args.app_name,
                                   server_name=args.server_name or 'main',
                                   server_required=args.server_name is not None)
    options.update({name: getattr(args, name) for name in _OVERRIDES
                    if getattr(args, name) is not None})
    return make_settings(options, config_file=config_file, app_name=args.app_name)


def main(argv=None):
    args = _parser().parse_args(argv)
    return launch.start(lambda: settings_from(args))


if __name__ == '__main__':
    sys.exit(main())
