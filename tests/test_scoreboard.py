"""The scoreboard (zkprefork/scoreboard.py): shared memory across a real
fork, and what real workers write in it as the monitor shows it."""
import collections
import http.client
import json
import os
import re
import signal
import socket
import threading
import time

import pytest

from support import Load, wait_until
from test_operations import ask, monitor_of
from zkprefork.worker import balance, scoreboard
from zkprefork.testing import IdleClients

APP = '''\
import os
import signal
import time

def factory(global_conf, **local):
    def app(environ, start_response):
        args = dict(p.partition('=')[::2] for p in environ.get('QUERY_STRING', '').split('&') if p)
        time.sleep(int(args.get('ms', 0)) / 1000)
        body = str(os.getpid()).encode()
        start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])
        return [body]
    return app
'''


@pytest.fixture
def start(servers, ini, tmp_path):
    """start(options) -> (server, monitor address): pid_app on 127.0.0.1, unregistered."""
    (tmp_path / 'pid_app.py').write_text(APP)
    env = {'PYTHONPATH': str(tmp_path), 'PYTHONDONTWRITEBYTECODE': '1'}

    def start(options=''):
        config = ini(f'host = 127.0.0.1\nmonitor_server = 127.0.0.1:0\n{options}', app='call:pid_app:factory')
        server = servers(config, env=env).wait_serving()
        return server, monitor_of(server)
    return start


class Result(list):
    """A thread's result (appended when it returns), and the thread."""


def in_thread(function, *args):
    """Run function(*args) in a thread; the returned list gets its result."""
    result = Result()

    def run():
        try:
            result.append(function(*args))
        except (OSError, http.client.HTTPException) as error:
            result.append(error)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result.thread = thread
    return result


def test_a_forked_worker_writes_and_the_parent_reads():
    boards = scoreboard.Scoreboards(workers=1, threads=2)
    record = boards.claim(workers=1, threads=2)
    pid = os.fork()
    if pid == 0:
        keeper = scoreboard.Scorekeeper(record)
        keeper.starting(os.getpid(), 2)
        keeper.set_state(scoreboard.SERVING)
        channels = [object() for _ in range(4)]  # stand-ins for zope.server channels
        for channel in channels:
            keeper.channel_opened(channel)
        keeper.channel_closed(channels.pop())
        for _ in range(3):
            keeper.request_started(channels[0], 'GET /quick HTTP/1.1')
            keeper.response_complete()
            keeper.request_finished()
        keeper.request_started(channels[1], 'GET /slow HTTP/1.1')  # left running
        os._exit(0)
    os.waitpid(pid, 0)
    assert record.head.pid == pid and record.state == scoreboard.SERVING
    assert record.head.connections == 3 and record.head.threads == 2
    # One thread busy, one connection that has not sent a request yet: no free thread.
    assert record.head.busy == 1 and record.head.waiting == 1
    assert record.standing() == balance.Standing(0, 3)
    assert record.requests() == 3
    [(thread, started, request, _)] = record.busy()
    assert thread == 0 and request == 'GET /slow HTTP/1.1'
    assert 0 < time.monotonic() - started < 10  # one monotonic clock for every process
    counts, total = record.histogram()
    assert counts[0] == 3 and 0 <= total < 0.005 * 3
    boards.release(record)
    assert boards.retired_buckets[0] == 3 and record.state == scoreboard.EMPTY


def test_boards_grow_when_a_worker_does_not_fit_and_go_when_unused():
    boards = scoreboard.Scoreboards(workers=40, threads=2)
    records = [boards.claim(40, 2) for _ in range(80)]
    assert len({record.board for record in records}) == 1
    assert boards.boards[0].header.used == 80
    more = boards.claim(50, 2)  # TTIN beyond twice the workers at start
    more_threads = boards.claim(50, 8)  # a reload raised threads
    assert more.board is not records[0].board and len(more.board.records) == 100
    assert more_threads.board.threads == 8 and len(boards.boards) == 3
    for record in records + [more]:
        boards.release(record)
    assert boards.boards == [more_threads.board]
    assert len(scoreboard.Scoreboards(workers=1, threads=1).boards[0].records) == scoreboard.MIN_RECORDS


def test_every_thread_is_free_again_after_answered_and_refused_requests(start):
    # A refused HEAD once told the scoreboard its thread was free though it
    # never counted it busy: balancing then saw a free thread too many.
    server, monitor = start('workers = 1\nthreads = 2\n')
    requests = [b'GET /?ms=1 HTTP/1.1\r\nHost: x\r\n\r\n', b'HEAD / HTTP/1.1\r\nHost: x\r\n\r\n',
                b'HEAD / HTTP/1.1\r\n\r\n', b'HEAD * HTTP/1.1\r\nHost: x\r\n\r\n',  # 400s without a body
                b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n']
    for request in requests * 2:
        with socket.create_connection(('127.0.0.1', server.port), timeout=10) as sock:
            sock.sendall(request)
            assert sock.recv(4096).startswith(b'HTTP/1.1 ')

    def idle():
        [worker] = json.loads(ask(monitor, b'status\n'))['workers']
        return worker if worker['connections'] == 0 else None
    worker = wait_until(idle, message='every connection closed')
    assert worker['free_threads'] == 2 and worker['requests'] == 4


def test_monitor_shows_connections_and_busy_threads(start):
    server, monitor = start('workers = 1\nthreads = 2\n')
    idle = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
    idle.request('GET', '/')
    idle.getresponse().read()
    slow = in_thread(server.request, '/slow?ms=3000', 30)

    def busy():
        [worker] = json.loads(ask(monitor, b'status\n'))['workers']
        return worker if worker['busy_threads'] and worker['busy_threads'][0]['busy'] >= 0.5 else None
    worker = wait_until(busy, message='a busy thread in the status')
    assert worker['connections'] == 2
    assert worker['busy_threads'][0]['request'] == 'GET /slow?ms=3000 HTTP/1.1'
    assert worker['requests'] == 1
    table = ask(monitor, b'workers\n')
    assert 'busy' in table.splitlines()[0]
    assert 'GET /slow?ms=3000 HTTP/1.1' in table
    slow.thread.join(10)
    assert slow[0][0] == 200
    idle.close()
    wait_until(lambda: json.loads(ask(monitor, b'status\n'))['workers'][0]['connections'] == 0,
               message='connections closed')
    assert json.loads(ask(monitor, b'status\n'))['workers'][0]['requests'] == 2


def test_max_requests_is_checked_at_the_request(start):
    # Before: checked once a second, a worker served ~1000 of 2000 fast
    # requests with max_requests = 100. Now a worker stops taking new
    # connections at its 100th request (while another worker serves) and
    # ends keep-alive: its overshoot is what it already had in hand.
    server, _ = start('workers = 1\nthreads = 2\nmax_requests = 100\n')
    [first] = {int(server.request('/')[1]) for _ in range(50)}  # the one worker's pid
    # A second worker 50 requests behind: the two never wear out together
    # (what max_requests_jitter is for), so one serves while the other's
    # replacement boots.
    server.signal(signal.SIGTTIN)
    server.wait_for_log(r'worker 1 \(pid \d+\) ready')
    with Load(server.port, clients=2, path='/?ms=50') as load:
        load.wait_for(400, timeout=60)
    served = collections.Counter({int(body): count for body, count in load.bodies.items()})
    served[first] += 50  # by pid, not the smallest: pids wrap
    print('requests per worker:', served)
    assert load.failures == []
    recycled = [pid for pid in served if f'(pid {pid}) asks to be replaced: served 100 requests' in server.log()]
    assert len(recycled) >= 3
    assert max(served.values()) <= 100 + 2


# -- no request lost when a worker retires (issue 13, item 3) --------------

def keep_alive(port):
    return http.client.HTTPConnection('127.0.0.1', port, timeout=15)


def ask_on(connection, path='/'):
    """(status, body, will_close) of a GET on a kept connection (plain
    http.client: it never probes a connection before reusing it)."""
    connection.request('GET', path)
    response = connection.getresponse()
    return response.status, response.read(), response.will_close


def idle_after(server, pattern, seconds, since):
    """Wait for `pattern` in the log, then until `seconds` after `since`."""
    server.wait_for_log(pattern)
    time.sleep(max(0.0, since + seconds - time.monotonic()))


def test_an_idle_connection_to_a_worker_retired_by_hup_is_still_answered(start):
    server, _ = start('workers = 1\n')
    connection = keep_alive(server.port)
    status, old, will_close = ask_on(connection)
    assert (status, will_close) == (200, False)
    server.signal(signal.SIGHUP)
    idle_after(server, rf'retiring worker 0 \(pid {int(old)}\)', 1.0, time.monotonic())
    status, body, will_close = ask_on(connection)  # to the retiring worker: answered, then closed
    assert (status, body, will_close) == (200, old, True)
    status, new, _ = ask_on(connection)  # http.client reconnects: the new worker
    assert status == 200 and new != old
    connection.close()


def test_idle_connections_to_a_worker_retired_by_ttou_are_still_answered(start):
    server, _ = start('workers = 2\n')
    connections, pids = [], set()
    while len(pids) < 2 or len(connections) < 6:
        connections.append(keep_alive(server.port))
        pids.add(int(ask_on(connections[-1])[1]))
        assert len(connections) < 100, 'every connection went to one worker'
    server.signal(signal.SIGTTOU)
    idle_after(server, r'retiring worker 1 \(pid \d+\): fewer workers wanted', 1.0, time.monotonic())
    answers = [ask_on(connection) for connection in connections]
    assert {status for status, _, _ in answers} == {200}
    for connection in connections:
        connection.close()


def test_an_idle_connection_to_a_worker_recycled_by_max_requests_is_still_answered(start):
    server, _ = start('workers = 1\nmax_requests = 2\n')
    idle, other = keep_alive(server.port), keep_alive(server.port)
    status, old, will_close = ask_on(idle)
    assert (status, will_close) == (200, False)
    assert ask_on(other)[2] is True  # the 2nd request: worn out, keep-alive ends
    idle_after(server, rf'retiring worker 0 \(pid {int(old)}\): served 2 requests', 1.0, time.monotonic())
    assert ask_on(idle) == (200, old, True)
    idle.close()
    other.close()


def test_a_final_sigterm_closes_idle_connections_at_once(start):
    server, _ = start('workers = 1\n')
    connection = keep_alive(server.port)
    assert ask_on(connection)[0] == 200
    stopping = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(10) == 0
    assert time.monotonic() - stopping < 3  # not the 5 s a retiring worker keeps them
    connection.close()


def test_clients_idling_between_requests_lose_nothing_to_hup_ttou_and_recycling(start):
    # Before: 57 of 386 requests failed across 4 HUPs with 40 such clients.
    server, _ = start('workers = 2\nthreads = 4\nmax_requests = 30\nmax_requests_jitter = 20\n')
    with IdleClients(server.port, clients=30) as clients:
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGHUP, signal.SIGTTOU, signal.SIGHUP):
            time.sleep(1.5)
            server.signal(signum)
        # Recycling too, however slowly this machine serves today.
        server.wait_for_log('asks to be replaced: served', timeout=30)
        time.sleep(3)
    print(f'{clients.ok} answered, failures: {clients.failures}')
    assert clients.failures == []
    assert clients.ok > 300


# -- request_timeout (issue 13, item 4) ------------------------------------

def test_a_request_past_request_timeout_gets_its_worker_replaced_and_its_stack_logged(start):
    server, monitor = start('workers = 2\nthreads = 2\nrequest_timeout = 1\ngraceful_timeout = 2\n')
    stuck = in_thread(server.request, '/?ms=30000', 30)
    busy = wait_until(lambda: [w for w in json.loads(ask(monitor, b'status\n'))['workers'] if w['busy_threads']],
                      message='the stuck request in the scoreboard')
    victim = busy[0]['pid']
    with Load(server.port, clients=6) as load:
        match = server.wait_for_log(r"worker \d \(pid (\d+)\): request 'GET /\?ms=30000 HTTP/1.1' "
                                    r"has run for [12]\.\d s \(request_timeout 1 s\) in thread \d; its stack:")
        assert int(match.group(1)) == victim
        server.wait_for_log(rf'retiring worker \d \(pid {victim}\): a request ran longer than request_timeout')
        server.wait_for_log(rf'\(pid {victim}\) gave up on 1 connection\(s\) after graceful_timeout')
        wait_until(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2,
                   message='the stuck worker gone, its replacement serving')
        load.wait_for(50)
    stack = re.split(r'\n\d{4}-\d\d-\d\d ', server.log()[match.end():])[0]  # up to the next log line
    assert 'pid_app.py' in stack and 'in app' in stack and 'time.sleep' in stack
    assert load.failures == []
    stuck.thread.join(10)
    assert isinstance(stuck[0], http.client.RemoteDisconnected)  # its worker gave up on it
    assert server.log().count('request_timeout 1 s') == 1


def test_a_request_past_request_timeout_is_logged_on_a_worker_already_retiring(start):
    # Before: a worker retiring for max_requests (or draining after a HUP)
    # never logged its stuck request.
    server, _ = start('workers = 1\nthreads = 2\nmax_requests = 2\nrequest_timeout = 1\ngraceful_timeout = 3\n')
    stuck = in_thread(server.request, '/?ms=2500', 30)
    time.sleep(0.2)
    assert server.request('/')[0] == 200  # the second request: the worker asks to be replaced
    server.wait_for_log(r'asks to be replaced: served 2 requests')
    server.wait_for_log(r"request 'GET /\?ms=2500 HTTP/1.1' has run for 1\.\d s \(request_timeout 1 s\)")
    stuck.thread.join(10)
    assert stuck[0][0] == 200  # it finished within graceful_timeout
    assert server.log().count('has run for') == 1


# -- balanced accepting (issue 13, item 5) ---------------------------------

def test_balance_prefers_a_free_thread_then_fewer_connections():
    S = balance.Standing
    assert not balance.defer(S(0, 5), [])  # alone: always accept
    assert balance.defer(S(0, 1), [S(1, 3)])  # no free thread here, one there
    assert not balance.defer(S(1, 3), [S(0, 1)])
    assert balance.defer(S(1, 1), [S(1, 0)])  # alike: fewer connections wins
    assert not balance.defer(S(1, 1), [S(1, 1)])  # ties accept both: nobody waits
    assert not balance.defer(S(4, 0), [S(4, 0), S(4, 0)])
    # The slack grows with the connections held: 1 + total / (8 × workers).
    assert balance.slack([S(4, 500), S(4, 500)]) == 63
    assert not balance.defer(S(4, 530), [S(4, 470)])
    assert balance.defer(S(4, 540), [S(4, 470)])
    # Every worker alike (all busy): nobody defers, connections are accepted at once.
    assert not any(balance.defer(S(0, 8), [S(0, 8)]) for _ in range(2))


def test_two_concurrent_slow_requests_on_new_connections_land_on_two_workers(start):
    # Before: on one worker (2 s, the other idle) in 4 of 10 trials.
    server, _ = start('workers = 2\nthreads = 1\n')
    for trial in range(10):
        pair = [in_thread(server.request, '/?ms=1000', 30) for _ in range(2)]
        for result in pair:
            result.thread.join(10)
        statuses = {result[0][0] for result in pair}
        pids = {result[0][1] for result in pair}
        assert statuses == {200} and len(pids) == 2, f'trial {trial}: both on one worker'


def test_new_connections_keep_going_to_the_worker_that_has_a_free_thread(start):
    # Before: the busy worker had decided to accept while both workers were
    # busy, and took the second short request once the other was free again
    # (5 of 5 trials, each waiting ~1.8 s behind the long request).
    server, _ = start('workers = 2\nthreads = 1\n')
    for trial in range(3):
        long = in_thread(server.request, '/?ms=1500', 30)
        time.sleep(0.2)  # the long request runs
        busy = wait_until(lambda: [w['pid'] for w in json.loads(ask(monitor_of(server), b'status\n'))['workers']
                                   if w['busy_threads']], message='the long request running')
        for gap in (0, 0.05, 0.2):
            time.sleep(gap)
            status, pid = server.request('/?ms=5')
            assert status == 200 and int(pid) not in busy, f'trial {trial}, gap {gap}: on the busy worker'
        long.thread.join(10)


def test_a_thousand_keep_alive_connections_on_two_workers(start):
    server, monitor = start('workers = 2\nthreads = 4\n')
    connections = [keep_alive(server.port) for _ in range(1000)]
    errors, pids = [], collections.Counter()
    try:
        for _ in range(2):  # a second round on the same (kept) connections
            for connection in connections:
                connection.request('GET', '/')
            for connection in connections:
                try:
                    response = connection.getresponse()
                    pids[response.read()] += 1
                    assert response.status == 200 and not response.will_close
                except (OSError, http.client.HTTPException, AssertionError) as error:
                    errors.append(repr(error))
        held = [w['connections'] for w in json.loads(ask(monitor, b'status\n'))['workers']]
    finally:
        for connection in connections:
            connection.close()
    print('connections per worker:', held, 'requests per worker:', sorted(pids.values()))
    assert errors == []
    assert sum(held) == 1000 and min(held) >= 400  # each about its share


# -- metrics (issue 13, item 6) ----------------------------------------------

def scrape(monitor):
    """GET /metrics on the monitor port, parsed: {sample name: {labels: value}}."""
    from prometheus_client.parser import text_string_to_metric_families
    connection = http.client.HTTPConnection(*monitor, timeout=10)
    connection.request('GET', '/metrics')
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == 200 and response.version == 10
    assert response.getheader('Content-Type').startswith('text/plain; version=0.0.4')
    samples = collections.defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_match_real_traffic(start):
    server, monitor = start('workers = 2\nthreads = 2\n')
    for _ in range(20):
        assert server.request('/')[0] == 200
    slow = [in_thread(server.request, '/?ms=400', 30) for _ in range(4)]
    before = wait_until(lambda: (lambda s: s if sum(s['zkprefork_worker_busy_threads'].values()) == 4 else None)(
        scrape(monitor)), message='four busy threads in the metrics')
    assert before['zkprefork_request_duration_seconds_count'][()] == 20
    for result in slow:
        result.thread.join(10)
    old = server.worker_pids()
    server.signal(signal.SIGHUP)
    wait_until(lambda: not server.worker_pids() & old and len(server.worker_pids()) == 2, message='a reload')
    for _ in range(6):
        assert server.request('/')[0] == 200
    samples = scrape(monitor)
    duration = samples['zkprefork_request_duration_seconds_bucket']
    # Every request, the reaped workers' included: 20 + 6 fast ones, 4 of 0.4 s.
    assert samples['zkprefork_request_duration_seconds_count'][()] == 30
    assert duration[(('le', '0.25'),)] == 26 and duration[(('le', '0.5'),)] == 30
    assert duration[(('le', '+Inf'),)] == 30
    assert 1.6 <= samples['zkprefork_request_duration_seconds_sum'][()] < 3
    per_worker = samples['zkprefork_worker_requests_total']
    assert {dict(labels)['pid'] for labels in per_worker} == {str(pid) for pid in server.worker_pids()}
    assert sum(per_worker.values()) == 6
    assert sum(samples['zkprefork_worker_request_duration_seconds_count'].values()) == 6
    assert sum(samples['zkprefork_worker_busy_threads'].values()) == 0
    assert samples['zkprefork_worker_restarts_total'] == {(('reason', 'reload'),): 2}
    assert samples['zkprefork_reloads_total'][()] == 1
    assert samples['zkprefork_workers'][()] == 2
    assert samples['zkprefork_registration_state'][(('state', 'off'),)] == 1
    assert samples['zkprefork_registration_state'][(('state', 'connected'),)] == 0
    # The same text from the line command.
    assert 'zkprefork_reloads_total 1.0' in ask(monitor, b'metrics\n')


def test_metrics_over_http_errors_and_the_line_protocol_side_by_side(start):
    server, monitor = start('workers = 1\n')
    answers = {}
    for request in (b'GET /other HTTP/1.1\r\nHost: x\r\n\r\n', b'POST /metrics HTTP/1.1\r\n\r\n',
                    b'GET /metrics HTTP/1.0\r\n' + b'X-Long: ' + b'y' * 9000 + b'\r\n\r\n'):
        answers[request[:12]] = ask(monitor, request).split('\r\n')[0]
    assert list(answers.values()) == ['HTTP/1.0 404 Not Found', 'HTTP/1.0 405 Method Not Allowed',
                                      'HTTP/1.0 400 Bad Request']
    assert json.loads(ask(monitor, b'status\n'))['pid'] == server.pid
    assert ask(monitor, b'GET /metrics HTTP/1.0\n\n').startswith('HTTP/1.0 200 OK\r\n')  # printf | nc
