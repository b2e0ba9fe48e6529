"""Metrics in Prometheus's text exposition format, read at each scrape
from the scoreboard (what the workers are doing and have done) and from
the master (restarts, reloads, registration). The monitor serves them: the
`metrics` command, and ``GET /metrics`` on its port.

prometheus_client writes the format; its own metric objects are not used
(they would live in one process, and its multiprocess mode wants files):
a collector yields families built from the shared memory at each scrape.
Request durations are one histogram for the server, the workers' live
counts plus those of the workers already reaped, so that it only ever
grows across reloads and recycling.
"""
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from zkprefork.master import status, upgrade
from zkprefork.master.registrar_link import REGISTRATION_STATES
from zkprefork.worker.scoreboard import BUCKETS

CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'


class MasterCollector:
    """A prometheus_client collector of one master's metrics."""

    def __init__(self, master):
        self.master = master

    def collect(self):
        yield from self._workers()
        yield self._durations()
        yield from self._master()

    def _workers(self):
        labels = ['slot', 'pid']
        requests = CounterMetricFamily('zkprefork_worker_requests', 'Requests each worker finished',
                                       labels=labels)
        busy = GaugeMetricFamily('zkprefork_worker_busy_threads', 'Threads running a request', labels=labels)
        connections = GaugeMetricFamily('zkprefork_worker_connections', 'Open client connections',
                                        labels=labels)
        durations = HistogramMetricFamily('zkprefork_worker_request_duration_seconds',
                                          'Time the application took for each request of this worker',
                                          labels=labels)
        for worker in sorted(self.master.pool.workers.values(), key=lambda w: (w.slot, w.pid)):
            values = [str(worker.slot), str(worker.pid)]
            counts, total = worker.record.histogram()
            requests.add_metric(values, sum(counts))
            busy.add_metric(values, len(worker.record.busy()))
            connections.add_metric(values, worker.record.head.connections)
            durations.add_metric(values, cumulative_buckets(counts), total)
        return requests, busy, connections, durations

    def _durations(self):
        boards = self.master.scoreboards
        counts, total = list(boards.retired_buckets), boards.retired_sum
        for worker in self.master.pool.workers.values():
            live, live_sum = worker.record.histogram()
            counts = [a + b for a, b in zip(counts, live)]
            total += live_sum
        return HistogramMetricFamily('zkprefork_request_duration_seconds',
                                     'Time the application took for each request, from every worker',
                                     buckets=cumulative_buckets(counts), sum_value=total)

    def _master(self):
        pool = self.master.pool
        restarts = CounterMetricFamily('zkprefork_worker_restarts', 'Workers replaced, by reason',
                                       labels=['reason'])
        for reason, count in sorted(pool.restarts.items()):
            restarts.add_metric([reason], count)
        yield restarts
        yield CounterMetricFamily('zkprefork_reloads', 'Reloads (SIGHUP) since start', value=pool.generation)
        yield GaugeMetricFamily('zkprefork_workers', 'Workers ready and not retiring', value=pool.serving())
        yield GaugeMetricFamily('zkprefork_workers_wanted', 'Workers wanted (workers, SIGTTIN, SIGTTOU)',
                                value=pool.count)
        registration = self.master.link.registration
        state = GaugeMetricFamily('zkprefork_registration_state',
                                  'The ZooKeeper registration state: 1 for the current one',
                                  labels=['state'])
        for name in dict.fromkeys((*REGISTRATION_STATES, registration['state'])):
            state.add_metric([name], int(name == registration['state']))
        yield state
        yield GaugeMetricFamily('zkprefork_registered_nodes', 'Nodes registered in ZooKeeper',
                                value=len(registration['nodes']))
        yield self._upgrade()
        if self.master.settings.tls:
            yield from self._tls()

    def _upgrade(self):
        current = self.master.upgrades.state
        state = GaugeMetricFamily('zkprefork_upgrade_state',
                                  "A live upgrade's state, 1 for the current one",
                                  labels=['state'])
        for name in upgrade.STATES:
            state.add_metric([name or 'none'], int(name == current))
        return state

    def _tls(self):
        certificate = self.master.certificate or {}
        expiry = GaugeMetricFamily('zkprefork_tls_certificate_expiry_timestamp_seconds',
                                   'When the served certificate expires (notAfter)', labels=['subject'])
        if certificate:
            expiry.add_metric([certificate['subject']], certificate['not_after'])
        yield expiry
        counts = status.handshakes(self.master)
        yield CounterMetricFamily('zkprefork_tls_handshakes', 'TLS handshakes completed',
                                  value=counts['completed'])
        failures = CounterMetricFamily('zkprefork_tls_handshake_failures',
                                       'TLS handshakes that failed, by reason', labels=['reason'])
        for reason, count in counts['failed'].items():
            failures.add_metric([reason], count)
        yield failures


def cumulative_buckets(counts):
    """[(upper bound, requests at most that long)] from counts per bucket."""
    cumulative, buckets = 0, []
    for bound, count in zip((*map(repr, BUCKETS), '+Inf'), counts):
        cumulative += count
        buckets.append((bound, cumulative))
    return buckets


def exposition(registry):
    """The text format of everything `registry` collects."""
    return generate_latest(registry).decode()


def registry_of(master):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MasterCollector(master))
    return registry
