"""The `zkprefork-providers` command: the providers registered under a
path, once, on every change (--watch), or fed to a command that
regenerates a proxy's configuration (--exec, the Synapse/confd pattern)."""
import argparse
import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from zkprefork import clock
from zkprefork.discovery.follower import OPTIONS
from zkprefork.discovery.providers import DiscoveryError, Providers
from zkprefork.errors import ConfigError
from zkprefork.nodeformat import FORMATS
from zkprefork.registrar import security as zksecurity
from zkprefork.registrar import session as zksession

PROG = 'zkprefork-providers'
# --exec runs CMD once a burst of changes is over: when no change came for
# COALESCE seconds, or COALESCE_MAX seconds after the burst's first change
# (a path that never settles still gets its command run).
COALESCE = 0.3
COALESCE_MAX = 2.0
FILE_VARIABLE = 'ZKPREFORK_PROVIDERS_FILE'
_STOP = 'stop'


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line and status 2, as the server's."""

    def error(self, message):
        self.exit(2, f'{PROG}: error: {message} (see {PROG} --help)\n')


def _seconds(text):
    """--timeout's value: a finite number of seconds, more than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number of seconds') from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'{text!r} is out of range (must be more than zero seconds)')
    return value


def _command(text):
    """--exec's value: a shell command, not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError('an empty command')
    return text


def _parser():
    parser = _OneLineParser(prog=PROG, description=(
        'Print the URLs of the providers registered under PATH, one per line; with --watch, '
        'a JSON line on every change; with --exec, run CMD after every change.'))
    add = parser.add_argument
    add('zookeeper', metavar='ZOOKEEPER', help='ZooKeeper connection string HOST:PORT[,...][/chroot]')
    add('path', metavar='PATH', help='the path under which the servers register')
    add('--format', '--node-format', dest='node_format', default='zk', metavar='F',
        help=f'the node format: {", ".join(FORMATS)} (default zk)')
    add('--json', action='store_true', help='print the full data of each provider, as JSON')
    add('--watch', action='store_true', help='print a JSON line per snapshot until SIGINT or SIGTERM')
    add('--exec', metavar='CMD', type=_command, help=(
        f'run CMD (with the shell) at the start and after each change of the providers\' URLs '
        f'(with --json, of their data too), the snapshot as JSON on its stdin and in the '
        f'file ${FILE_VARIABLE}; never two at once; a burst of changes runs it once, {COALESCE} s '
        f'after the last (at most {COALESCE_MAX} s after the first), and not at all if it ends '
        f'where the last run was'))
    add('--timeout', type=_seconds, default=10.0, metavar='S',
        help='seconds to wait for ZooKeeper without --watch or --exec, which wait as long as '
             'it takes (default 10)')
    for option in OPTIONS:  # the server's names: --zookeeper-ca-file for zookeeper_ca_file
        add(f'--{option.replace("_", "-")}', dest=option, metavar='VALUE', help=f"as the server's {option}")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f'{PROG}: %(name)s: %(message)s')
    zksession.quiet_kazoo_repeats()
    following = args.watch or args.exec
    if not following:
        logging.getLogger('kazoo').setLevel(logging.ERROR)  # our one line says why
    options = {option: getattr(args, option) for option in OPTIONS if getattr(args, option) is not None}
    try:
        providers = Providers(args.zookeeper, args.path, args.node_format, **options)
    except ConfigError as error:
        print(f'{PROG}: error: {error}', file=sys.stderr)
        return 2
    with providers:
        try:
            if following:
                return _follow(providers, args)
            return _print_once(providers, args)
        except DiscoveryError as error:
            print(f'{PROG}: {error}', file=sys.stderr)
            return 1


def _print_once(providers, args):
    try:
        snapshot = providers.wait(args.timeout)
    except TimeoutError as error:
        tls = providers.config.tls
        problem = tls and zksecurity.tls_problem(providers.config.addresses, tls)
        print(f'{PROG}: {error}{f" (TLS: {problem})" if problem else ""}', file=sys.stderr)
        return 1
    if args.json:
        print(to_json(snapshot))
    for provider in () if args.json else snapshot:
        print(provider.url)
    return 0


def to_json(snapshot):
    """A snapshot as one line of JSON: [{name, host, port, scheme, url, data}, ...]."""
    return json.dumps([provider.as_json() for provider in snapshot], separators=(',', ':'))


def _follow(providers, args):
    inbox = queue.SimpleQueue()  # snapshots, a DiscoveryError, or _STOP from a signal
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: inbox.put(_STOP))  # SimpleQueue.put is reentrant
    threading.Thread(target=_forward, args=(providers, inbox), daemon=True).start()
    runner = Runner(args.exec, full=args.json) if args.exec else None

    def show(snapshot):
        if args.watch:
            print(to_json(snapshot), flush=True)
    try:
        item = inbox.get()
        while item is not _STOP:
            if isinstance(item, DiscoveryError):
                raise item
            show(item)
            if runner:
                item, after = settle(inbox, item, show)
                runner.run(item)
                item = after if after is not None else inbox.get()
            else:
                item = inbox.get()
        return 0
    finally:
        if runner:
            runner.close()


def _forward(providers, inbox):
    try:
        for snapshot in providers:
            inbox.put(snapshot)
    except DiscoveryError as error:
        inbox.put(error)


def settle(inbox, snapshot, show=lambda snapshot: None):
    """(the last snapshot of the burst that `snapshot` starts, the first item
    after it that is no snapshot, or None); `show` sees each snapshot."""
    deadline = clock.now() + COALESCE_MAX
    while (wait := min(COALESCE, deadline - clock.now())) > 0:
        try:
            item = inbox.get(timeout=wait)
        except queue.Empty:
            break
        if not isinstance(item, list):
            return snapshot, item
        show(item)
        snapshot = item
    return snapshot, None


class Runner:
    """Runs one shell command at a time with a snapshot on its stdin and in
    the file named by $ZKPREFORK_PROVIDERS_FILE (replaced atomically, kept
    until close()), for a snapshot whose URLs (`full`: whose data too)
    differ from the last run's: a proxy's reload is not free (HAProxy
    closes its idle client connections), and a reload of a server or a
    change of its worker count only changes the data."""

    def __init__(self, command, full=False):
        self.command = command
        self.full = full
        self.last = None  # what the last run was given, as compared
        self.directory = tempfile.mkdtemp(prefix='zkprefork-providers-')
        self.file = os.path.join(self.directory, 'providers.json')

    def run(self, snapshot):
        text = to_json(snapshot) + '\n'
        seen = text if self.full else [(provider.name, provider.url) for provider in snapshot]
        if seen == self.last:
            return
        self.last = seen
        with open(self.file + '.new', 'w', encoding='utf-8') as file:
            file.write(text)
        os.replace(self.file + '.new', self.file)
        status = subprocess.run(self.command, shell=True, input=text.encode(),
                                env=dict(os.environ, **{FILE_VARIABLE: self.file})).returncode
        if status:
            print(f'{PROG}: {self.command!r} exited with status {status}', file=sys.stderr, flush=True)

    def close(self):
        shutil.rmtree(self.directory, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
