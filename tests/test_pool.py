"""The pool's rules, driven by a fake clock and fake processes: no fork, no
sleep. (test_reload.py checks the same rules against real processes.)"""
import dataclasses
import logging
import os

from zkprefork.worker import protocol as worker_protocol
from zkprefork.lines import LineReader
from zkprefork.master.pool import KILL_GRACE, BootFailedAtStart, Kill, Pool, Retire, Spawn, Stage
from zkprefork.settings import Settings
from zkprefork.supervision import NEVER, Backoff
from zkprefork.worker.protocol import BootFailed, Heartbeat, Ready, RetireRequest


class Hands:
    """Does what the master does with the pool's actions, on pretend pids."""

    def __init__(self, workers=2, **options):
        options.setdefault('timeout', 0)  # no heartbeats here unless a test sends them
        self.settings = Settings(workers=workers, **options)
        self.pool = Pool(self.settings)
        self.now = 1000.0
        self.next_pid = 100
        self.sent = []  # (signal name, pid, reason)
        self.stopped = []  # BootFailedAtStart actions

    def perform(self, actions):
        for action in actions:
            if isinstance(action, Spawn):
                self.pool.started(action.slot, self.next_pid, self.now)
                self.next_pid += 1
            elif isinstance(action, (Retire, Kill)):
                self.sent.append((type(action).__name__, action.pid, action.reason))
            elif isinstance(action, BootFailedAtStart):
                self.stopped.append(action)
        return actions

    def converge(self):
        return self.perform(self.pool.converge(self.now))

    def tick(self, seconds):
        self.now += seconds
        return self.perform(self.pool.expired(self.now))

    def ready(self, *pids):
        for pid in pids:
            self.pool.heard(pid, [Ready(pid)], self.now)

    def exit(self, pid, how='exit status 0'):
        return self.perform(self.pool.exited(pid, how, self.now))

    def booted(self):
        """Every slot ready and the master running, as after BOOTING."""
        self.converge()
        self.ready(*self.pool.workers)
        self.pool.booting = False
        assert self.pool.all_ready()
        return set(self.pool.workers)


def test_empty_slots_are_filled_once():
    hands = Hands(workers=3)
    assert hands.converge() == [Spawn(0), Spawn(1), Spawn(2)]
    assert hands.converge() == []  # idempotent: booting workers fill their slots
    assert not hands.pool.all_ready()
    hands.ready(*hands.pool.workers)
    assert hands.pool.all_ready() and hands.pool.serving() == 3


def test_reload_replaces_one_at_a_time_each_ready_before_its_old_one_retires():
    hands = Hands(workers=3)
    old = hands.booted()
    hands.pool.reload(hands.settings)
    assert hands.pool.reloading()
    replaced = []
    for _ in range(10):
        hands.converge()
        booting = [w for w in hands.pool.workers.values() if w.state.stage is Stage.STARTING]
        assert len(booting) <= 1, 'two replacements at once'
        for name, pid, reason in hands.sent:
            assert name == 'Retire' and reason == 'reloaded: its replacement is ready'
            slot = hands.pool.workers[pid].slot
            assert any(w.state.stage is Stage.RUNNING and w.generation == 1 and w.slot == slot
                       for w in hands.pool.workers.values()), 'retired before its replacement was ready'
        for name, pid, _ in hands.sent:
            replaced.append(pid)
            hands.exit(pid)
        hands.sent.clear()
        hands.ready(*(w.pid for w in booting))
    assert sorted(replaced) == sorted(old)
    assert {w.generation for w in hands.pool.workers.values()} == {1}
    assert hands.pool.all_ready() and not hands.pool.reloading()
    assert hands.pool.restarts == {'reload': 3}


def test_a_replacement_that_fails_to_boot_halts_the_reload_and_the_next_reload_retries(caplog):
    hands = Hands(workers=2)
    old = hands.booted()
    hands.pool.reload(hands.settings)
    assert hands.converge() == [Spawn(0)]
    new_pid = max(hands.pool.workers)
    hands.pool.heard(new_pid, [BootFailed('RuntimeError: deploy went wrong')], hands.now)
    with caplog.at_level(logging.ERROR, 'zkprefork.master'):
        assert hands.exit(new_pid, 'exit status 3') == []
    assert ('reload halted: the new worker 0 (pid %d) failed to boot: RuntimeError: deploy went wrong; '
            'the old workers keep serving; nothing is retried before the next SIGHUP' % new_pid
            in caplog.text)
    assert 'next try' not in caplog.text  # nothing will try before the next reload
    assert hands.pool.reload_halted and not hands.pool.reloading()
    for _ in range(3):  # long after the back-off: still the old workers, nothing retired
        hands.tick(60)
        assert hands.converge() == []
        assert set(hands.pool.workers) == old and hands.sent == []
    hands.pool.reload(hands.settings)  # a fixed deploy
    assert hands.converge() == [Spawn(0)]


def test_a_halted_reload_leaves_no_deadline_in_the_past():
    # A back-off the pool will not act on must not make the loop spin.
    hands = Hands(workers=1)
    hands.booted()
    hands.pool.reload(hands.settings)
    hands.converge()
    hands.exit(max(hands.pool.workers), 'exit status 3')
    hands.tick(10)
    assert hands.converge() == []
    assert hands.pool.next_deadline(hands.now) > hands.now


def test_boot_failures_back_off_doubling_to_30_s_and_reset_when_ready():
    hands = Hands(workers=1)
    hands.booted()
    hands.exit(next(iter(hands.pool.workers)), 'killed by SIGKILL')  # a ready worker: replaced at once
    delays = []
    for _ in range(9):
        [spawn] = hands.converge()
        hands.exit(max(hands.pool.workers), 'exit status 3')  # never ready
        due = hands.pool.next_deadline(hands.now)
        delays.append(due - hands.now)
        hands.now = due - 0.01
        assert hands.converge() == [], 'started before its back-off was over'
        hands.now = due
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    hands.converge()
    hands.ready(max(hands.pool.workers))
    hands.exit(max(hands.pool.workers), 'killed by SIGKILL')
    hands.converge()
    hands.exit(max(hands.pool.workers), 'exit status 3')
    assert hands.pool.next_deadline(hands.now) - hands.now == 0.5


def test_surplus_slots_are_retired_and_never_fewer_than_one():
    hands = Hands(workers=3)
    hands.booted()
    slot2 = next(w.pid for w in hands.pool.workers.values() if w.slot == 2)
    assert hands.pool.resize(-1) == 2
    assert hands.converge() == [Retire(slot2, 'fewer workers wanted')]
    assert hands.converge() == []
    assert [hands.pool.resize(-1) for _ in range(3)] == [1, 1, 1]
    assert [a.reason for a in hands.converge()] == ['fewer workers wanted']


def test_ttin_and_ttou_count_survives_a_reload_unless_workers_changed():
    hands = Hands(workers=2)
    hands.pool.resize(+1)
    hands.pool.reload(hands.settings)
    assert hands.pool.count == 3
    hands.pool.reload(dataclasses.replace(hands.settings, threads=4))
    assert hands.pool.count == 3
    hands.pool.reload(dataclasses.replace(hands.settings, workers=5))
    assert hands.pool.count == 5
    assert hands.pool.generation == 3


def test_a_first_generation_boot_failure_during_boot_stops_the_master():
    hands = Hands(workers=2)
    hands.converge()
    pid = min(hands.pool.workers)
    hands.pool.heard(pid, [BootFailed('ImportError: no such module')], hands.now)
    hands.exit(pid, 'exit status 3')
    assert hands.stopped == [BootFailedAtStart(0, pid, 'ImportError: no such module')]


def test_once_running_a_boot_failure_is_retried_not_fatal():
    hands = Hands(workers=1)
    hands.booted()
    hands.exit(next(iter(hands.pool.workers)), 'killed by SIGKILL')
    hands.converge()
    hands.exit(max(hands.pool.workers), 'exit status 3')
    assert hands.stopped == [] and hands.pool.backoff[0].failures == 1


def test_heartbeat_timeout_kills_once_and_the_loop_waits_for_the_reap(caplog):
    hands = Hands(workers=2, timeout=2)
    hands.booted()
    frozen, alive = sorted(hands.pool.workers)
    hands.now += 1.5
    hands.pool.heard(alive, [Heartbeat(7)], hands.now)
    with caplog.at_level(logging.ERROR, 'zkprefork.master'):
        assert hands.tick(0.6) == [Kill(frozen, 'sent no heartbeat for 2.1 s (timeout)')]
        for _ in range(50):  # the master's loop turns until the kill is reaped
            assert hands.pool.expired(hands.now) == []
            assert hands.pool.next_deadline(hands.now) > hands.now
    assert caplog.text.count('killing it') == 1
    assert hands.pool.workers[alive].requests == 7
    hands.exit(frozen, 'killed by SIGKILL')
    assert hands.converge() == [Spawn(0)]
    hands.exit(alive, 'exit status 1')
    assert hands.pool.restarts == {'timeout': 1, 'exited': 1}


def test_a_retiring_worker_is_killed_after_graceful_timeout_and_grace():
    hands = Hands(workers=1, graceful_timeout=10)
    [pid] = hands.booted()
    hands.pool.resize(+1)
    hands.pool.heard(pid, [RetireRequest('max_requests', 'served 300 requests (max_requests)')], hands.now)
    assert hands.converge() == [Spawn(0), Spawn(1)]  # its replacement, and the new slot
    hands.ready(*(p for p in hands.pool.workers if p != pid))
    assert hands.converge() == [Retire(pid, 'served 300 requests (max_requests)')]
    assert hands.pool.restarts == {'max_requests': 1}
    assert hands.tick(10 + KILL_GRACE - 0.1) == []
    assert hands.tick(0.1) == [Kill(pid, 'still running after graceful_timeout')]
    assert hands.tick(100) == []


def test_not_ready_within_boot_timeout_is_killed_and_counts_as_a_boot_failure(caplog):
    hands = Hands(workers=1, boot_timeout=5)
    hands.booted()
    hands.pool.booting = True  # still booting: the kill stops the master
    hands.exit(next(iter(hands.pool.workers)), 'killed by SIGKILL')
    hands.pool.booting = False
    hands.converge()
    [pid] = hands.pool.workers
    assert hands.tick(5) == [Kill(pid, 'not ready within boot_timeout (5 s)')]
    with caplog.at_level(logging.ERROR, 'zkprefork.master'):
        hands.exit(pid, 'killed by SIGKILL')
    assert 'failed to boot: not ready within boot_timeout (5 s); next try in 0.5 s' in caplog.text


def test_stopping_retires_everyone_and_spawns_nothing(caplog):
    hands = Hands(workers=2, graceful_timeout=1)
    pids = hands.booted()
    assert set(hands.pool.retire_all(hands.now)) == pids
    assert hands.converge() == []
    with caplog.at_level(logging.INFO, 'zkprefork.master'):
        hands.exit(min(pids), 'exit status 0')
    assert 'exited: exit status 0' in caplog.text and 'unexpectedly' not in caplog.text
    assert hands.pool.next_deadline(hands.now) == hands.now + 1 + KILL_GRACE
    assert set(hands.pool.retire_all(hands.now, graceful=False)) == {max(pids)}
    assert hands.pool.next_deadline(hands.now) == hands.now + KILL_GRACE


def test_worker_protocol_round_trip():
    for message in (Ready(42), Heartbeat(1234), RetireRequest('max_memory', 'resident memory 300 MB > max_memory'),
                    BootFailed('ImportError: no module named x')):
        line = worker_protocol.encode(message)
        assert line.endswith(b'\n') and line.count(b'\n') == 1
        assert worker_protocol.decode(line.decode().rstrip('\n')) == message
    assert worker_protocol.encode(BootFailed('two\nlines')) == b'boot-failed two lines\n'
    for garbage in ('hb many', 'frobnicate 1', 'ready', '', 'retire max_requests'):
        assert worker_protocol.decode(garbage) is None


def test_line_reader_joins_lines_split_between_reads():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    reader = LineReader(lambda size: os.read(read_end, size))
    try:
        assert reader.lines() == []
        os.write(write_end, b'ready 1\nhb ')
        assert reader.lines() == ['ready 1']
        os.write(write_end, b'5\n\n')
        assert reader.lines() == ['hb 5']
        os.close(write_end)
        assert reader.lines() is None
    finally:
        os.close(read_end)


def test_backoff_deadline_past_is_no_deadline():
    backoff = Backoff()
    assert backoff.failed(100.0) == 0.5 and backoff.deadline(100.0) == 100.5
    assert backoff.deadline(101.0) == NEVER
    assert not backoff.take(100.2) and backoff.take(100.5) and backoff.not_before is None
