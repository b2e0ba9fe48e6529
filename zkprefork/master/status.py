"""What the master tells about itself: the data of its ZooKeeper node(s),
the monitor's status and workers table, the monitor's built-in commands,
and the state and status line it reports to systemd."""
import json
import os
import signal
import time

import psutil

import zkprefork
from zkprefork import addresses, tls
from zkprefork.errors import ConfigError
from zkprefork.master.pool import Stage

# The master's phases, in the order it goes through them (as status reports them).
BOOTING, RUNNING, UNREGISTERING, DRAINING, CLOSING, DONE = (
    'booting', 'running', 'unregistering', 'draining', 'closing', 'done')
# A worker's stage as the monitor shows it (README documents these words).
SHOWN_STAGES = {Stage.STARTING: 'booting', Stage.RUNNING: 'ready', Stage.RETIRING: 'retiring'}


class MasterView:
    """The master as this module and metrics.py see it: these attributes,
    read-only (what they report cannot change what they report on)."""
    VISIBLE = frozenset({'settings', 'port', 'instance', 'phase', 'started_at', 'running_since',
                         'pool', 'link', 'scoreboards', 'notifier', 'monitor', 'url', 'certificate',
                         'upgrades'})
    __slots__ = ('_master',)

    def __init__(self, master):
        object.__setattr__(self, '_master', master)

    def __getattr__(self, name):
        if name not in self.VISIBLE:
            raise AttributeError(f'the master view shows no {name!r}')
        return getattr(self._master, name)

    def __setattr__(self, name, value):
        raise AttributeError('the master view is read-only')


def node_data(master):
    """What the node(s) say: a dict, compact JSON in ZooKeeper."""
    scheme = {'scheme': 'https'} if master.settings.tls else {}
    return {'pid': os.getpid(), 'instance': master.instance, 'workers': master.pool.count,
            'generation': master.pool.generation, **master.monitor.node_data(), **scheme}


def endpoints(master):
    """(host, port) for each node: where clients reach the server (never a wildcard host)."""
    return [(host, master.port) for host in addresses.advertised_hosts(master.settings.host)]


def status(master):
    """The master and every worker, as a JSON-ready dict (the `status` command)."""
    now = time.monotonic()
    return {
        'version': zkprefork.__version__,
        'pid': os.getpid(),
        'config_file': master.settings.config_file,
        'uptime': round(now - master.started_at, 3),
        'phase': master.phase,
        'listening': master.url(),
        'generation': master.pool.generation,
        'workers_wanted': master.pool.count,
        'registration': master.link.registration,
        'upgrade': master.upgrades.status(),  # None, or upgrade.Upgrades.status()
        'tls': tls_status(master),
        'workers': [_worker_status(w, now) for w in
                    sorted(master.pool.workers.values(), key=lambda w: (w.slot, w.started))],
    }


def certificate_of(settings):
    """What the served certificate says (tls.certificate), read when the
    settings were: None without TLS, or if the file changed so much since
    that it no longer reads (the workers loaded it before)."""
    if not settings.tls:
        return None
    try:
        return tls.certificate(settings.certfile)
    except ConfigError:
        return None


def handshakes(master):
    """TLS handshakes of every worker, reaped ones included: {'completed':
    N, 'failed': {reason: N}} (reasons: tls.HANDSHAKE_FAILURES)."""
    counts = list(master.scoreboards.retired_handshakes)
    for worker in master.pool.workers.values():
        counts = [a + b for a, b in zip(counts, worker.record.handshakes())]
    return {'completed': counts[0], 'failed': dict(zip(tls.HANDSHAKE_FAILURES, counts[1:]))}


def tls_status(master):
    """None without TLS; else the certificate's subject, issuer and
    validity (seconds since the epoch), and the handshakes."""
    if not master.settings.tls:
        return None
    return {'certfile': master.settings.certfile, 'certificate': master.certificate,
            'cert_reqs': master.settings.cert_reqs, 'handshakes': handshakes(master)}


def _worker_status(worker, now):
    try:
        rss = psutil.Process(worker.pid).memory_info().rss
    except psutil.Error:
        rss = None
    record = worker.record
    busy = [{'thread': number, 'busy': round(max(0.0, now - started), 3), 'request': request}
            for number, started, request, _ in record.busy()]
    return {'slot': worker.slot, 'pid': worker.pid, 'age': round(now - worker.started, 3),
            'requests': record.requests(), 'rss': rss, 'state': SHOWN_STAGES[worker.state.stage],
            'generation': worker.generation, 'connections': record.head.connections,
            'free_threads': record.standing()[0], 'busy_threads': busy}


def workers_table(connection):
    """The `workers` command: one line per worker (rss in MB), then one
    line per busy thread with how long its request has been running."""
    connection.write(f'{"slot":>4} {"pid":>7} {"state":<8} {"gen":>3} {"age s":>9} '
                     f'{"requests":>9} {"conns":>5} {"busy":>4} {"rss MB":>7}\n')
    for w in connection.status()['workers']:
        rss = f'{w["rss"] / 1048576:.1f}' if w['rss'] is not None else '-'
        connection.write(f'{w["slot"]:>4} {w["pid"]:>7} {w["state"]:<8} {w["generation"]:>3} '
                         f'{w["age"]:>9.1f} {w["requests"]:>9} {w["connections"]:>5} '
                         f'{len(w["busy_threads"]):>4} {rss:>7}\n')
        for thread in w['busy_threads']:
            connection.write(f'{"":>13}thread {thread["thread"]} busy {thread["busy"]:.1f} s: '
                             f'{thread["request"]}\n')


def monitor_commands(master, queue_signal):
    """The monitor's built-in commands: name -> (function(connection), help);
    `queue_signal(signum)` queues a signal for the master's loop."""
    def queue(signum):
        return lambda connection: (queue_signal(signum),
                                   connection.write(f'{signal.Signals(signum).name} queued\n'))

    def metrics_text(connection):
        # Imported at the first scrape: prometheus_client's import (~30 ms)
        # would otherwise lie on every start's way to registration.
        from zkprefork.master import metrics
        connection.write(metrics.exposition(metrics.registry_of(master)))
    return {
        'help': (lambda c: master.monitor.help(c), 'the commands, one line each'),
        'status': (lambda c: c.write(json.dumps(c.status(), indent=1) + '\n'),
                   'the master and every worker, as JSON'),
        'workers': (workers_table, 'the workers, as a table'),
        'metrics': (metrics_text,
                    "Prometheus's text format (also GET /metrics on this port)"),
        'reload': (queue(signal.SIGHUP), 'rolling reload, as SIGHUP'),
        'ttin': (queue(signal.SIGTTIN), 'one worker more, as SIGTTIN'),
        'ttou': (queue(signal.SIGTTOU), 'one worker less, as SIGTTOU'),
        'upgrade': (queue(signal.SIGUSR2), 'live upgrade: a new master takes over, as SIGUSR2'),
    }


def systemd_state(master, now):
    """'starting', 'ready', 'reloading' or 'stopping' (systemd.Notifier's states).

    Ready means serving and registered, or serving for boot_timeout
    without ZooKeeper's answer: systemd must not wait for ZooKeeper forever."""
    if master.phase == BOOTING:
        return 'starting'
    if master.phase != RUNNING:
        return 'stopping'
    if master.pool.reloading():
        return 'reloading'
    settled = master.link.settled() or now >= systemd_ready_by(master)
    return 'ready' if settled or master.notifier.state != 'starting' else 'starting'


def systemd_ready_by(master):
    """When the master says READY=1 at the latest (monotonic seconds)."""
    if master.phase != RUNNING or master.notifier.state != 'starting':
        return float('inf')
    return master.running_since + master.settings.boot_timeout


def status_line(master):
    """systemd's STATUS= line."""
    return (f'{master.phase}: {master.pool.serving()} worker(s) serving {master.url()}; '
            f'{master.link.describe()}')
