"""The worker pool: numbered slots, the master's view of each worker, and
the rules that keep "every slot has one up-to-date, ready worker".

The pool decides; the master acts. Every decision comes back as an action
(Spawn, Retire, Kill, BootFailedAtStart) that the master carries out with
fork and signals, and every method takes the current monotonic time, so
that the rules run, and are tested, without processes or clocks.

`converge()` is an idempotent step towards the goal: it fills empty slots,
replaces stale workers one at a time (a replacement must be ready before
the worker it replaces is retired), and retires surplus slots. Reloads,
resizing and recycling are all just ways of making workers stale or slots
surplus. A replacement that fails to boot halts the reload: the old
workers keep serving until the next reload tries again.
"""
import collections
import dataclasses
import enum
import logging
from typing import NamedTuple

from zkprefork.supervision import NEVER, Backoff
from zkprefork.worker.protocol import BootFailed, Heartbeat, Ready, RetireRequest

# The pool is the master's; its lines keep the logger users filter on.
log = logging.getLogger('zkprefork.master')

KILL_GRACE = 5.0  # seconds beyond graceful_timeout before a draining worker is killed


class Spawn(NamedTuple):
    """Fork a worker into `slot`, then tell the pool with `started()`."""
    slot: int


class Retire(NamedTuple):
    """Send SIGTERM: the worker stops accepting and drains."""
    pid: int
    reason: str


class Kill(NamedTuple):
    """Send SIGKILL; the pool decides this once per worker."""
    pid: int
    reason: str


class BootFailedAtStart(NamedTuple):
    """A first-generation worker failed to boot: the master stops, status 1."""
    slot: int
    pid: int
    reason: str


class Stage(enum.Enum):
    """Where a worker is in its life (the monitor's words for it: status.py)."""
    STARTING = 'starting'
    RUNNING = 'running'
    RETIRING = 'retiring'


class WorkerState(enum.Enum):
    """A worker's state in the pool (supervisor's ProcessStates are the
    model): its stage, and whether SIGKILL was decided. A killed worker
    keeps its stage, which says what its exit means (a boot failure, a
    timeout, the end it was sent), and only waits to be reaped.
    `WorkerProcess.enter` makes every transition (_TRANSITIONS)."""
    STARTING = (Stage.STARTING, False)  # forked, not ready: boot_timeout runs
    RUNNING = (Stage.RUNNING, False)  # said Ready: the heartbeat timeout runs
    RETIRING = (Stage.RETIRING, False)  # sent SIGTERM: drains until kill_at
    STARTING_KILLED = (Stage.STARTING, True)
    RUNNING_KILLED = (Stage.RUNNING, True)
    RETIRING_KILLED = (Stage.RETIRING, True)

    @property
    def stage(self):
        """Its Stage."""
        return self.value[0]

    @property
    def killed(self):
        return self.value[1]


# event -> {state: next state}. An event a state does not list leaves it
# as it is (Ready from a worker already retiring), except 'kill', which
# the pool decides once per worker (asserted).
_TRANSITIONS = {
    'ready': {WorkerState.STARTING: WorkerState.RUNNING,
              WorkerState.STARTING_KILLED: WorkerState.RUNNING_KILLED},
    'retire': {WorkerState.STARTING: WorkerState.RETIRING, WorkerState.RUNNING: WorkerState.RETIRING,
               WorkerState.STARTING_KILLED: WorkerState.RETIRING_KILLED,
               WorkerState.RUNNING_KILLED: WorkerState.RETIRING_KILLED},
    'kill': {WorkerState.STARTING: WorkerState.STARTING_KILLED,
             WorkerState.RUNNING: WorkerState.RUNNING_KILLED,
             WorkerState.RETIRING: WorkerState.RETIRING_KILLED},
}


@dataclasses.dataclass(eq=False)
class WorkerProcess:
    """The master's view of one worker."""
    slot: int
    pid: int
    generation: int
    started: float  # monotonic seconds
    link: object = None  # the master's end of its socket; the pool never touches it
    record: object = None  # its scoreboard.Record; nor this
    last_seen: float = None  # last message, monotonic seconds
    state: WorkerState = WorkerState.STARTING
    boot_error: str = None  # why it failed to boot, once it said (BootFailed) or did not in time
    requests: int = 0
    wants_replacement: str = None  # the reason it gave
    limit_reached: str = None  # and the option it reached (max_requests...)
    kill_at: float = NEVER  # when a retiring worker is killed

    def __post_init__(self):
        if self.last_seen is None:
            self.last_seen = self.started

    def enter(self, event):
        """Make the transition of `event` ('ready', 'retire', 'kill')."""
        transitions = _TRANSITIONS[event]
        if event == 'kill' and self.state not in transitions:
            raise AssertionError(f'worker {self.slot} (pid {self.pid}): kill in state {self.state.name}')
        self.state = transitions.get(self.state, self.state)


class Pool:
    """Slots and workers. `settings` gives workers (at start), boot_timeout,
    timeout (heartbeat, 0 = none) and graceful_timeout, all in seconds."""

    def __init__(self, settings):
        self.settings = settings
        self.workers = {}  # pid -> WorkerProcess
        self.count = settings.workers  # slots wanted; TTIN/TTOU change it
        self.generation = 0  # bumped by every reload
        self.reload_halted = False  # a replacement failed to boot: keep the old workers
        self.booting = True  # until the master runs: a first boot failure is fatal
        self.stopping = False  # the master stops: exits are expected, nothing respawns
        self.backoff = collections.defaultdict(Backoff)  # slot -> its start back-off
        self.restarts = collections.Counter()  # workers replaced, by reason (for metrics)

    # -- what the master tells the pool ----------------------------------

    def reload(self, settings):
        """A new generation: every worker becomes stale. The TTIN/TTOU count
        stands unless the configuration's `workers` changed."""
        if settings.workers != self.settings.workers:
            self.count = settings.workers
        self.settings = settings
        self.generation += 1
        self.reload_halted = False

    def resize(self, change):
        self.count = max(1, self.count + change)
        return self.count

    def started(self, slot, pid, now, link=None):
        """The master forked the worker a Spawn asked for."""
        worker = WorkerProcess(slot, pid, self.generation, now, link)
        self.workers[pid] = worker
        log.info('worker %d started (pid %d)', slot, pid)
        return worker

    def heard(self, pid, messages, now):
        """Messages (worker_protocol) from a worker."""
        worker = self.workers.get(pid)
        if worker is None or not messages:
            return
        worker.last_seen = now
        for message in messages:
            self._on_message(worker, message)

    def _on_message(self, worker, message):
        if isinstance(message, Heartbeat):
            worker.requests = message.requests
        elif isinstance(message, Ready):
            worker.enter('ready')
            self.backoff[worker.slot].reset()
            log.info('worker %d (pid %d) ready', worker.slot, worker.pid)
        elif isinstance(message, RetireRequest) and worker.wants_replacement is None:
            worker.wants_replacement = message.reason
            worker.limit_reached = message.limit
            log.info('worker %d (pid %d) asks to be replaced: %s', worker.slot, worker.pid, message.reason)
        elif isinstance(message, BootFailed):
            worker.boot_error = message.error

    def exited(self, pid, how, now):
        """A worker was reaped (`how`: 'exit status 0', 'killed by SIGKILL')."""
        worker = self.workers.pop(pid, None)
        if worker is None:
            return []
        stage = worker.state.stage
        if self.stopping or stage is Stage.RETIRING:
            log.info('worker %d (pid %d) exited: %s', worker.slot, worker.pid, how)
        elif stage is Stage.STARTING:
            return self._boot_failed(worker, worker.boot_error or how, now)
        else:
            self.restarts['timeout' if worker.state.killed else 'exited'] += 1
            log.warning('worker %d (pid %d) exited unexpectedly: %s; replacing it',
                        worker.slot, worker.pid, how)
        return []

    def _boot_failed(self, worker, reason, now):
        self.restarts['boot_failed'] += 1
        if self.booting and worker.generation == 0:
            log.error('worker %d (pid %d) failed to boot: %s', worker.slot, worker.pid, reason)
            return [BootFailedAtStart(worker.slot, worker.pid, reason)]
        delay = self.backoff[worker.slot].failed(now)
        if any(self._stale(other) for other in self._current()[worker.slot]):
            # Nothing retries a halted reload: say so, not a next try.
            self.reload_halted = True
            log.error('reload halted: the new worker %d (pid %d) failed to boot: %s; '
                      'the old workers keep serving; nothing is retried before the next SIGHUP',
                      worker.slot, worker.pid, reason)
        else:
            log.error('worker %d (pid %d) failed to boot: %s; next try in %.1f s',
                      worker.slot, worker.pid, reason, delay)
        return []

    def retire_all(self, now, graceful=True):
        """The master stops: every worker drains, and is killed if still
        there after graceful_timeout + KILL_GRACE (KILL_GRACE alone if not
        `graceful`). Returns the pids to signal."""
        self.stopping = True
        kill_at = now + KILL_GRACE + (self.settings.graceful_timeout if graceful else 0)
        for worker in self.workers.values():
            worker.enter('retire')
            worker.kill_at = min(worker.kill_at, kill_at)
        return list(self.workers)

    # -- convergence -----------------------------------------------------

    def _current(self):
        """Workers that are not retiring, by slot."""
        slots = collections.defaultdict(list)
        for worker in self.workers.values():
            if worker.state.stage is not Stage.RETIRING:
                slots[worker.slot].append(worker)
        return slots

    def _stale(self, worker):
        outdated = worker.generation < self.generation and not self.reload_halted
        return outdated or worker.wants_replacement is not None

    def converge(self, now):
        """One idempotent step towards `count` up-to-date, ready workers."""
        if self.stopping:
            return []
        actions = []
        slots = self._current()
        replacing = any(w.state.stage is Stage.STARTING and any(self._stale(o) for o in slots[w.slot])
                        for here in slots.values() for w in here)
        for slot in range(self.count):
            here = slots.get(slot, [])
            stale = [w for w in here if self._stale(w)]
            fresh = [w for w in here if not self._stale(w)]
            if not here:
                actions += self._spawn_when_due(slot, now)
            elif stale and any(w.state.stage is Stage.RUNNING for w in fresh):
                for w in stale:
                    self.restarts[w.limit_reached or 'reload'] += 1
                    reason = w.wants_replacement or 'reloaded: its replacement is ready'
                    actions.append(self._retire(w, reason, now))
            elif stale and not fresh and not replacing:
                spawn = self._spawn_when_due(slot, now)
                replacing = bool(spawn)
                actions += spawn
        for slot, here in slots.items():
            if slot >= self.count:
                actions += [self._retire(w, 'fewer workers wanted', now) for w in here]
        return actions

    def _spawn_when_due(self, slot, now):
        return [Spawn(slot)] if self.backoff[slot].take(now) else []

    def _retire(self, worker, reason, now):
        log.info('retiring worker %d (pid %d): %s', worker.slot, worker.pid, reason)
        worker.enter('retire')
        worker.kill_at = now + self.settings.graceful_timeout + KILL_GRACE
        return Retire(worker.pid, reason)

    # -- deadlines -------------------------------------------------------

    def _deadline_of(self, worker):
        stage = worker.state.stage
        if worker.state.killed:
            return NEVER
        if stage is Stage.RETIRING:
            return worker.kill_at
        if stage is Stage.STARTING:
            return worker.started + self.settings.boot_timeout
        if self.settings.timeout:
            return worker.last_seen + self.settings.timeout
        return NEVER

    def expired(self, now):
        """Kills for the workers past a deadline; each is decided (and
        logged) once, then the worker only waits to be reaped."""
        actions = []
        for worker in self.workers.values():
            if self._deadline_of(worker) > now:
                continue
            stage = worker.state.stage
            if stage is Stage.RETIRING:
                reason = 'still running after graceful_timeout'
            elif stage is Stage.STARTING:
                worker.boot_error = f'not ready within boot_timeout ({self.settings.boot_timeout:g} s)'
                reason = worker.boot_error
            else:
                reason = f'sent no heartbeat for {now - worker.last_seen:.1f} s (timeout)'
            worker.enter('kill')
            log.error('worker %d (pid %d) %s: killing it', worker.slot, worker.pid, reason)
            actions.append(Kill(worker.pid, reason))
        return actions

    def next_deadline(self, now):
        """The soonest time (monotonic seconds) the pool has something to do; NEVER if none."""
        times = [self._deadline_of(w) for w in self.workers.values()]
        if not self.stopping:
            times += [backoff.deadline(now) for backoff in self.backoff.values()]
        return min(times, default=NEVER)

    # -- what the pool tells ---------------------------------------------

    def all_ready(self):
        current = [w for here in self._current().values() for w in here]
        return len(current) >= self.count and all(w.state.stage is Stage.RUNNING for w in current)

    def serving(self):
        """How many workers are ready and not retiring."""
        return sum(w.state.stage is Stage.RUNNING for w in self.workers.values())

    def reloading(self):
        return any(self._stale(w) and w.generation < self.generation
                   for here in self._current().values() for w in here)
