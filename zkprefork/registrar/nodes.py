"""The registrar's nodes: what should exist in ZooKeeper, and making it so.

The desired state is one Wanted entry per endpoint of the last register
command (none after an unregister command), and the nodes we may still
hold that are no longer wanted (Doomed). Nodes.ensure() converges ZooKeeper
to it: it deletes the doomed nodes, creates what is missing, adopts what
this session already owns, updates what differs, and holds back where the
name is taken. Every write is retried until ZooKeeper confirms it or the
session ends; what is reported as registered is only what ZooKeeper
confirmed.
Each node found under the service path gets a verdict: OURS (this
session's), STALE (an earlier incarnation of this server: replaced in the
same transaction as our create), FOREIGN (another live server: held back
until it goes) or PERSISTENT (in the way until someone deletes it).
"""
import logging
import time
import typing

import psutil
from kazoo.exceptions import (
    AuthFailedError, BadArgumentsError, BadVersionError, EphemeralOnLocalSessionError,
    InvalidACLError, KazooException, NoAuthError, NoChildrenForEphemeralsError, NodeExistsError,
    NoNodeError, NotEmptyError, QuotaExceededError, UnimplementedError)
from kazoo.handlers.threading import KazooTimeoutError

from zkprefork import nodeformat
from zkprefork.registrar import security as zksecurity

log = logging.getLogger('zkprefork.registrar')

RETRY_SOON = 0.2  # seconds before another look, after losing a race for a node
RETRY_LATER = 1.0  # after an error that a live connection may not repeat
# Node ctime (ZooKeeper's clock) against a process start time (ours): a pid
# that started later than the node is not the process that made it.
CLOCK_SLACK = 2.0

# Errors that trying again cannot fix: reported as such, once.
PERMANENT = (NoAuthError, AuthFailedError, InvalidACLError, EphemeralOnLocalSessionError,
             NoChildrenForEphemeralsError, QuotaExceededError, BadArgumentsError,
             UnimplementedError)
# A node changed between our look and our write: look again.
RACES = (NodeExistsError, NoNodeError, BadVersionError, NotEmptyError)

OURS, STALE, FOREIGN, PERSISTENT = 'ours', 'stale', 'foreign', 'persistent'


class Refused(Exception):
    """ZooKeeper refuses what retrying will not change; the message is one line."""


def _join(parent, name):
    return parent.rstrip('/') + '/' + name


def _alive(pid, since):
    """Whether process `pid` runs here and was already running at `since`."""
    try:
        process = psutil.Process(pid)
        return (process.status() != psutil.STATUS_ZOMBIE
                and process.create_time() <= since + CLOCK_SLACK)
    except psutil.Error:
        return False


def verdict(session_id, claim, stat):
    """OURS, STALE, FOREIGN or PERSISTENT, for a node with `stat` whose data
    makes `claim` (a nodeformat.Claim)."""
    if stat.ephemeralOwner == session_id:
        return OURS
    if stat.ephemeralOwner == 0:
        return PERSISTENT
    # An earlier incarnation of this server: this master's previous
    # registrar, or a master that is no more (the name, or the endpoint in
    # the data, says it served our host and port).
    if claim.same_instance or (claim.pid and not _alive(claim.pid, stat.ctime / 1000.0)):
        return STALE
    return FOREIGN


def held_back(path, found, raw, stat):
    """Why `path` cannot be ours yet, in one line."""
    if found == PERSISTENT:
        return (f'cannot register {path}: a persistent node of that name is in the way '
                '(registrations are ephemeral); delete it and registration follows')
    return (f'cannot register {path}: it belongs to another live server '
            f'(session 0x{stat.ephemeralOwner:x}, {raw.decode(errors="replace")}); '
            'registering as soon as it goes')


def refusal(error, path, base, session):
    """Why ZooKeeper refused to register `path` under `base`, in one line."""
    credentials = session.credentials
    who = credentials.identity if credentials else 'an anonymous client'
    if isinstance(error, NoAuthError):
        hint = ('a wrong password, or an ACL that does not grant that user'
                if credentials else 'set zookeeper_credentials_file or _env')
        return (f'ZooKeeper refused {who} to register {path} (NoAuth: {hint}; '
                f'ZooKeeper checks the ACL of {base})')
    if isinstance(error, AuthFailedError):
        return session.rejected_credentials()
    if isinstance(error, EphemeralOnLocalSessionError):
        return (f'ZooKeeper refuses ephemeral nodes to this session: cannot register {path} '
                '(EphemeralOnLocalSession: the server has local sessions that are never upgraded)')
    if isinstance(error, NoChildrenForEphemeralsError):
        return f'cannot register {path}: {base} is an ephemeral node, which cannot have children'
    return f'ZooKeeper refused to register {path}: {type(error).__name__}'


class Wanted:
    """One endpoint to register, and what we know of its node."""

    def __init__(self, node, base):
        self.base = base
        self.path = None
        self.ours = False  # confirmed owned by the current session
        self.written = False  # a create was sent: a node may exist, answer or not
        self.set_node(node)

    def set_node(self, node):
        self.node = node
        if not node.sequential:
            self.path = _join(self.base, node.name)

    @property
    def target(self):
        """Where to create it: the name, or the prefix of a sequential node."""
        return _join(self.base, self.node.name) if self.node.sequential else self.path


class Doomed(typing.NamedTuple):
    """A node we may hold that is no longer wanted: deleted once ZooKeeper
    confirms it, or gone with the session that held it."""
    endpoint: tuple
    path: str  # None for a member whose create was never answered
    confirmed: bool  # ZooKeeper confirmed that the current session holds it


class NodeWriter:
    """The writes that make a wanted node ours, each confirmed by ZooKeeper
    before the entry says so."""

    def __init__(self, session, watch):
        self.session = session
        self.watch = watch
        self.path_acl, self.node_acl = zksecurity.acls(session.credentials, session.identity)
        self.look_again = False  # a node of ours went while we wrote it

    def adopt(self, wanted, mine, stale):
        """Our session already has a member (its create's answer was lost):
        keep one, and clear out any duplicate or stale one."""
        (path, raw, stat), extra = mine[0], mine[1:] + stale
        wanted.path, wanted.ours = path, True
        if extra:
            transaction = self.session.transaction()
            for other, _, other_stat in extra:
                transaction.delete(other, version=other_stat.version)
            self.session.commit(transaction)
        self.watch_ours(wanted)
        if raw != wanted.node.data:
            self.update(wanted, stat)

    def watch_ours(self, wanted):
        """Be told when our node changes or goes. It may be gone already,
        deleted between our write and this look: then look again."""
        if not self.session.call('exists', wanted.path, watch=self.watch):
            wanted.ours = False
            self.look_again = True

    def create(self, wanted, stale=()):
        self.write(wanted, stale)
        for path, raw, stat in stale:
            log.info('took over %s from an earlier session (0x%x) of this server: %s',
                     path, stat.ephemeralOwner, raw.decode(errors='replace'))
        log.info('registered %s %s', wanted.path, wanted.node.data.decode())

    def write(self, wanted, replaced):
        """Create our node, deleting the `replaced` ones in the same
        transaction: never a moment without a node, nor one that will vanish
        with an old session later."""
        transaction = self.session.transaction()
        for path, _, stat in replaced:
            transaction.delete(path, version=stat.version)
        transaction.create(wanted.target, wanted.node.data, acl=self.node_acl,
                           ephemeral=True, sequence=wanted.node.sequential)
        wanted.written = True
        wanted.path = self.session.commit(transaction)[-1]
        wanted.ours = True
        self.watch_ours(wanted)

    def update(self, wanted, stat):
        # In place, at the version we read: the node keeps its name, czxid
        # and member number; watchers of the children notice nothing.
        self.session.call('set', wanted.path, wanted.node.data, stat.version)
        log.info('updated %s %s', wanted.path, wanted.node.data.decode())


class Reconciling:
    """The part of Nodes that compares one wanted node with what ZooKeeper
    holds under the service path (a verdict per node found) and has the
    NodeWriter write, adopt or update it, or holds it back."""

    def _reconcile(self, wanted):
        if wanted.node.sequential:
            self._reconcile_member(wanted)
        else:
            self._reconcile_named(wanted)
        if wanted.ours:
            self.problems.pop(wanted.node.endpoint, None)

    def _verdict(self, name, raw, stat):
        return verdict(self.session.id, nodeformat.read_claim(self.format, name, raw, self.instance), stat)

    def _reconcile_named(self, wanted):
        try:
            raw, stat = self.session.call('get', wanted.path, watch=self.watch)
        except NoNodeError:
            self.writer.create(wanted)
            return
        found = self._verdict(wanted.node.name, raw, stat)
        if found == OURS:
            wanted.ours = True
            if raw != wanted.node.data:
                self.writer.update(wanted, stat)
        elif found == STALE:
            self.writer.create(wanted, [(wanted.path, raw, stat)])
        else:
            self._hold_back(wanted, wanted.path, found, raw, stat)

    def _reconcile_member(self, wanted):
        """A sequential node's name is only known once made: find ours
        among the members by the endpoint it advertises."""
        if wanted.ours and self._still_ours(wanted):
            return
        wanted.ours = False
        mine, stale, held = self._members_of(wanted.node.endpoint)
        if mine:
            self.writer.adopt(wanted, mine, stale)
        elif held:
            path, raw, stat, found = held[0]
            self.session.call('exists', path, watch=self.watch)
            self._hold_back(wanted, path, found, raw, stat)
        else:
            self.writer.create(wanted, stale)

    def _still_ours(self, wanted):
        try:
            raw, stat = self.session.call('get', wanted.path, watch=self.watch)
        except NoNodeError:
            return False
        if stat.ephemeralOwner != self.session.id:
            return False
        if raw != wanted.node.data:
            self.writer.update(wanted, stat)
        return True

    def _members_of(self, endpoint):
        """The members advertising `endpoint`: (ours, stale, held back), as
        (path, data, stat) each, held back ones with their verdict."""
        prefix = nodeformat.TABLE[self.format].member_prefix
        names = [name for name in self.session.call('get_children', self.base)
                 if name.startswith(prefix)]
        mine, stale, held = [], [], []
        for path, raw, stat in self.session.get_many([_join(self.base, name) for name in names]):
            name = path.rpartition('/')[2]
            if nodeformat.read_claim(self.format, name, raw, self.instance).endpoint != endpoint:
                continue
            found = self._verdict(name, raw, stat)
            if found == OURS:
                mine.append((path, raw, stat))
            elif found == STALE:
                stale.append((path, raw, stat))
            else:
                held.append((path, raw, stat, found))
        return mine, stale, held

    def _hold_back(self, wanted, path, found, raw, stat):
        problem = held_back(path, found, raw, stat)
        if self.problems.get(wanted.node.endpoint) != problem:
            log.error('%s', problem)
        self.problems[wanted.node.endpoint] = problem


class Nodes(Reconciling):
    """The desired state and its reconciliation, through a zksession.Session."""

    def __init__(self, config, session, watch):
        """`config`: a RegistrarConfig; `watch`: one callable (kazoo keeps a
        single watcher per node and callable) run on kazoo's event thread."""
        self.session = session
        self.watch = watch
        self.writer = NodeWriter(session, watch)
        self.format = config.node_format
        self.base = config.service_path
        self.properties = config.properties
        self.wanted = []
        self.data = None  # of the last register command
        self.instance = None
        self.registered_at = None  # ms; the curator format shows it
        self.problems = {}  # endpoint -> one line
        self.doomed = []  # Doomed, until ZooKeeper confirms each gone
        self.path_ready = False
        # The session resumed from a previous registrar of this master: the
        # nodes it holds are ours, although no command of ours made them.
        self.resumed = config.resume[0] if config.resume else None

    def register(self, endpoints, data):
        """Want one node per (host, port) of `endpoints` with `data`; delete
        the ones no longer wanted."""
        self.data, self.instance = data, data.get('instance')
        if self.registered_at is None:
            self.registered_at = int(time.time() * 1000)
        before = {wanted.node.endpoint: wanted for wanted in self.wanted}
        self.wanted = []
        for node in nodeformat.nodes(self.format, self.base, endpoints, data,
                                     self.properties, self.registered_at):
            wanted = before.pop(node.endpoint, None) or Wanted(node, self.base)
            wanted.set_node(node)
            self.wanted.append(wanted)
        self._doom(before.values())
        wanted_again = {wanted.node.endpoint for wanted in self.wanted}
        self.doomed = [d for d in self.doomed if d.endpoint not in wanted_again]

    def unregister(self):
        """Want nothing: every node we may hold is to be deleted."""
        wanted, self.wanted = self.wanted, []
        self._doom(wanted)

    def _doom(self, wanted):
        for each in wanted:
            self.problems.pop(each.node.endpoint, None)
            if each.ours or each.written:
                self.doomed.append(Doomed(each.node.endpoint, each.path, each.ours))

    def new_session(self):
        """The session changed: nothing is known to be ours any more (a
        node of the old session may remain until it expires: what is
        doomed is still looked for, and deleted if it is there)."""
        self.path_ready = False
        for wanted in self.wanted:
            wanted.ours = False
        self.doomed = [d._replace(confirmed=False) for d in self.doomed]

    def session_lost(self):
        """ZooKeeper expired the session: its nodes are gone with it."""
        self.new_session()
        self.resumed = None
        for wanted in self.wanted:
            wanted.written = False
        self.doomed = []

    def registered(self):
        """The full paths ZooKeeper confirmed the current session holds,
        sorted: the wanted ones, and the doomed ones not yet deleted."""
        return sorted([wanted.path for wanted in self.wanted if wanted.ours]
                      + [d.path for d in self.doomed if d.confirmed])

    def may_hold(self):
        """Whether the session may hold a node of ours (confirmed, or
        written without an answer, or not looked for yet)."""
        return bool(self.registered()) or not self.settled() or any(w.written for w in self.wanted)

    def settled(self):
        """Nothing left to delete (nor any resumed session's nodes to look for)."""
        return not self.doomed and self.resumed is None

    # -- making the nodes what they should be ---------------------------

    def ensure(self, deletes_only=False):
        """Delete what is doomed, then (unless `deletes_only`) make every
        wanted node exist, owned by this session, with our data. Returns
        None when done, or seconds before looking again; raises Refused."""
        self.writer.look_again = False
        current = None
        if not self.wanted and self.settled():
            return None
        try:
            self._ensure_path()
            self._take_back_resumed()
            while self.doomed:
                self._delete(self.doomed[0])
                self.doomed.pop(0)
            for current in ([] if deletes_only else self.wanted):
                self._reconcile(current)
        except PERMANENT as error:
            raise Refused(refusal(error, current.target if current else self.base,
                                  self.base, self.session)) from None
        except RACES as error:
            log.debug('%s changed under us (%r); looking again', self.base, error)
            if isinstance(error, NoNodeError):
                self.path_ready = False  # the service path went
            return RETRY_SOON
        except (KazooException, KazooTimeoutError) as error:
            log.warning('registration in ZooKeeper interrupted (%r); trying again', error)
            return RETRY_LATER
        return 0 if self.writer.look_again else None

    def _take_back_resumed(self):
        """In the session a previous registrar held, its nodes not wanted
        now (all of them after an unregister) are doomed, and reported as
        registered until deleted: the state never says less than ZooKeeper
        holds. The wanted ones are found by reconciling."""
        if self.resumed is None:
            return
        if self.session.id == self.resumed:
            wanted = {each.node.endpoint for each in self.wanted}
            for path, raw, stat in self.session.get_many(
                    [_join(self.base, name) for name in self.session.call('get_children', self.base)]):
                name = path.rpartition('/')[2]
                endpoint = nodeformat.read_claim(self.format, name, raw, self.instance).endpoint
                if stat.ephemeralOwner == self.resumed and endpoint not in wanted:
                    self.doomed.append(Doomed(endpoint, path, True))
        self.resumed = None

    def _delete(self, doomed):
        """Delete the doomed node if it is there and ours (this session's, or
        left by an earlier session of this server), at its version."""
        if doomed.path is None:
            mine, stale, _ = self._members_of(doomed.endpoint)
            found = mine + stale
        else:
            try:
                raw, stat = self.session.call('get', doomed.path)
            except NoNodeError:
                return
            name = doomed.path.rpartition('/')[2]
            found = [(doomed.path, raw, stat)] if self._verdict(name, raw, stat) in (OURS, STALE) else []
        for path, _, stat in found:
            try:
                self.session.call('delete', path, version=stat.version)
            except NoNodeError:
                continue
            log.info('unregistered %s', path)

    def _ensure_path(self):
        if self.path_ready or self.base == '/':
            return
        if not self.session.call('exists', self.base):
            parent = self.base.rpartition('/')[0]
            if parent:
                self.session.call('ensure_path', parent)
            try:
                self.session.call('create', self.base, acl=self.writer.path_acl)
            except NodeExistsError:
                pass
        if self.session.credentials:
            self._check_path_acl()
        self.path_ready = True

    def _check_path_acl(self):
        acl, _ = self.session.call('get_acls', self.base)
        if zksecurity.open_to_anyone(acl):
            log.warning('the ACL of %s (made without credentials?) lets anyone create or delete '
                        'nodes there, so anyone may delete or fake registrations', self.base)
