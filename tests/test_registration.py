"""Registration that never lies, against a real ZooKeeper: session expiry,
restarts, absence at start, stale, foreign and persistent nodes, external
deletes, an ensemble losing the member we talk to, and each node format."""
import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from kazoo.exceptions import NoAuthError
from kazoo.recipe.watchers import ChildrenWatch

from support import (dead_pid, ensemble_hosts, free_port, log_times, read_curator_instance,
                     read_serverset_member, read_synapse_backend, registrar_of, wait_until)
from zkprefork.registrar.protocol import RegistrarConfig
from zkprefork.settings import make_settings


def start_registered(servers, ini, hosts, path, options='', port=0, env=None):
    config = ini(f'zookeeper = {hosts}\npath = {path}\nhost = 127.0.0.1\nport = {port}\n{options}')
    server = servers(config, env=env).wait_serving()
    return server, f'{path}/127.0.0.1:{server.port}'


def owner(zk, node):
    stat = zk.exists(node)
    return stat.ephemeralOwner if stat else None


def wait_owned(zk, node, other_than=None, timeout=10.0):
    def owned():
        found = owner(zk, node)
        return found if found and found != other_than else None
    return wait_until(owned, timeout, interval=0.01, message=f'{node} to be registered')


def test_expired_session_is_replaced_and_the_node_recreated_at_once(servers, ini, zookeeper, zk, zk_path):
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, 'session_timeout = 1000\n')
    first = wait_owned(zk, node)
    data = zk.get(node)[0]
    registrar = registrar_of(server)
    registrar.suspend()  # frozen past the session timeout: ZooKeeper expires the session
    try:
        wait_until(lambda: not zk.exists(node), timeout=10, message='the session to expire')
        assert server.request('/')[0] == 200  # serving all along
    finally:
        registrar.resume()
    resumed = time.monotonic()
    second = wait_owned(zk, node, other_than=first)
    assert time.monotonic() - resumed < 2.0
    assert zk.get(node)[0] == data
    assert zk.get_children(zk_path) == [node.rpartition('/')[2]]
    server.wait_for_log(r'ZooKeeper connected, session 0x%x, registered: %s' % (second, node))
    assert 'ZooKeeper lost, session none' in server.log()


# ZooKeeper 3.8.0 accepts connections a moment before it serves, and leaves
# those unanswered (it fails to close them): a client that comes then waits
# for its connect timeout, the session timeout divided by the number of hosts.
# Naming the one server three times keeps that wait well inside the session.
def test_zookeeper_restarted_within_the_session_timeout_changes_nothing(servers, ini, own_zookeeper,
                                                                       kazoo_client, zk_path):
    # The longest session this ZooKeeper allows: a restart of its JVM on a
    # loaded machine must stay well within it.
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    server, node = start_registered(servers, ini, ','.join([zookeeper.hosts] * 3), zk_path,
                                    'session_timeout = 20000\n')
    zk = kazoo_client(zookeeper.hosts)
    wait_owned(zk, node)
    before = zk.exists(node)
    connections = server.log().count('ZooKeeper connected')
    zookeeper.restart()
    server.wait_for_log('ZooKeeper suspended')
    wait_until(lambda: server.log().count('ZooKeeper connected') > connections, timeout=10,
               message='the registrar to reconnect')
    after = zk.exists(node)
    # The same node of the same session: not deleted, not re-created, not rewritten.
    assert (after.czxid, after.mzxid, after.ephemeralOwner) == (before.czxid, before.mzxid,
                                                                before.ephemeralOwner)
    assert server.log().count('registered /') == 1


def test_zookeeper_down_longer_than_the_session_timeout(servers, ini, own_zookeeper, kazoo_client, zk_path):
    zookeeper = own_zookeeper()
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, 'session_timeout = 1000\n')
    wait_owned(kazoo_client(zookeeper.hosts), node)
    zookeeper.restart(down_for=2.0)
    assert server.request('/')[0] == 200
    zk = kazoo_client(zookeeper.hosts)
    # Whether the old session expired before the registrar came back or
    # not, things settle on one node owned by a session that is connected.
    wait_until(lambda: owner(zk, node) in zookeeper.session_ids(), timeout=10,
               message='the node to be owned by a connected session')
    assert zk.get_children(zk_path) == [node.rpartition('/')[2]]
    assert json.loads(zk.get(node)[0])['pid'] == server.pid


def test_zookeeper_absent_at_start(servers, ini, own_zookeeper, kazoo_client, zk_path):
    zookeeper = own_zookeeper(start=False)
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, 'session_timeout = 2000\n')
    server.wait_for_log('serving unregistered; registering as soon as ZooKeeper answers')
    assert server.request('/')[0] == 200
    zookeeper.start()
    started = time.monotonic()
    wait_owned(kazoo_client(zookeeper.hosts), node)
    # The reconnection back-off is capped (2 s, jittered), plus at worst one
    # connect timeout lost to ZooKeeper's start (see above).
    assert time.monotonic() - started < 6.0


def test_stale_node_of_an_earlier_incarnation_is_taken_over(servers, ini, zookeeper, zk, kazoo_client,
                                                            zk_path):
    port = free_port()
    node = f'{zk_path}/127.0.0.1:{port}'
    earlier = kazoo_client(zookeeper.hosts)
    earlier.create(node, json.dumps({'pid': dead_pid(), 'instance': 'earlier'}).encode(),
                   ephemeral=True, makepath=True)
    server, _ = start_registered(servers, ini, zookeeper.hosts, zk_path, port=port)
    ours = wait_owned(zk, node, other_than=earlier.client_id[0])
    assert json.loads(zk.get(node)[0])['pid'] == server.pid
    server.wait_for_log(r'took over %s from an earlier session \(0x%x\)' % (node, earlier.client_id[0]))
    earlier.stop()  # the old session ends: our node stays
    zk.sync(zk_path)  # stop() returned once the session was closed: our client sees that now
    assert owner(zk, node) == ours


def restart_registrar(server, session, node):
    """Kill the registrar; return once the next one holds `node` in `session`."""
    line = f'ZooKeeper connected, session 0x{session:x}, registered: {node}'
    before = server.log().count(line)
    os.kill(registrar_of(server).pid, signal.SIGKILL)  # its session lives on
    wait_until(lambda: server.log().count(line) > before, timeout=5,
               message=f'a new registrar holding {node} in session 0x{session:x}')


@contextlib.contextmanager
def gaps_of(zk, node):
    """The times (monotonic) `node` was seen missing while in the block,
    sampled every 5 ms (the scenario: a watcher that samples that often)."""
    gaps = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            if not zk.exists(node):
                gaps.append(time.monotonic())
            time.sleep(0.005)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield gaps
    finally:
        watching.set()
        watcher.join()


def test_restarted_registrar_resumes_the_session_and_keeps_the_node(servers, ini, zookeeper, zk, zk_path):
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, 'session_timeout = 4000\n')
    first = wait_owned(zk, node)
    before = zk.exists(node)
    with gaps_of(zk, node) as gaps:
        restart_registrar(server, first, node)
    assert gaps == []
    after = zk.exists(node)
    # The same node, of the same session: never deleted, never re-created.
    assert (after.czxid, after.ephemeralOwner) == (before.czxid, first)
    assert zk.get_children(zk_path) == [node.rpartition('/')[2]]


def test_a_live_owner_is_not_robbed(servers, ini, zookeeper, zk, kazoo_client, zk_path):
    port = free_port()
    node = f'{zk_path}/127.0.0.1:{port}'
    other = kazoo_client(zookeeper.hosts)
    other.create(node, json.dumps({'pid': os.getpid(), 'instance': 'other'}).encode(),
                 ephemeral=True, makepath=True)
    server, _ = start_registered(servers, ini, zookeeper.hosts, zk_path, port=port)
    server.wait_for_log(f'cannot register {node}: it belongs to another live server')
    others = other.client_id[0]
    assert owner(zk, node) == others
    other.stop()
    gone = time.monotonic()
    wait_owned(zk, node, other_than=others)
    assert time.monotonic() - gone < 1.0
    assert len(re.findall(r'ERROR .*belongs to another live server', server.log())) == 1


def test_a_persistent_node_is_refused(servers, ini, zookeeper, zk, zk_path):
    port = free_port()
    node = f'{zk_path}/127.0.0.1:{port}'
    zk.create(node, b'{"pid":1}', makepath=True)
    server, _ = start_registered(servers, ini, zookeeper.hosts, zk_path, port=port)
    server.wait_for_log(f'cannot register {node}: a persistent node of that name is in the way')
    assert owner(zk, node) == 0
    zk.delete(node)
    wait_owned(zk, node)


def test_external_delete_is_repaired_and_data_follows_the_master(servers, ini, zookeeper, zk, zk_path):
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path)
    session = wait_owned(zk, node)
    zk.delete(node)
    deleted = time.monotonic()
    assert wait_owned(zk, node) == session
    assert time.monotonic() - deleted < 1.0
    server.signal(signal.SIGTTIN)
    wait_until(lambda: json.loads(zk.get(node)[0])['workers'] == 2, message='the data to follow')
    assert owner(zk, node) == session
    assert zk.get_children(zk_path) == [node.rpartition('/')[2]]


def test_ensemble_with_chroot_survives_the_death_of_our_member(servers, ini, ensemble, kazoo_client):
    # A session that outlives a leader election, should ours be the leader.
    members = ensemble(3, extra='maxSessionTimeout=20000\n')
    server, node = start_registered(servers, ini, ensemble_hosts(members, '/apps/zkprefork'),
                                    '/providers', 'session_timeout = 10000\n')
    zk = kazoo_client(ensemble_hosts(members))
    full_node = '/apps/zkprefork' + node
    session = wait_owned(zk, full_node)
    ours = wait_until(lambda: [m for m in members if session in m.session_ids()],
                      message='the member our session is connected to')[0]
    ours.kill()
    survivors = [m for m in members if m is not ours]
    wait_until(lambda: any(session in m.session_ids() for m in survivors), timeout=15,
               message='the session to move to another member')
    zk = kazoo_client(ensemble_hosts(survivors))
    assert owner(zk, full_node) == session
    assert server.log().count('registered /') == 1
    assert zk.get_children('/apps/zkprefork/providers') == [node.rpartition('/')[2]]


def test_serverset_members(servers, ini, zookeeper, zk, zk_path):
    server, _ = start_registered(servers, ini, zookeeper.hosts, zk_path,
                                 'node_format = serverset\nproperties =\n  shard = 2\n  dc = east\n'
                                 'session_timeout = 4000\n')
    [member] = wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='a member')
    data, stat = zk.get(f'{zk_path}/{member}')
    entry = read_serverset_member(member, data)
    assert entry['service'] == ('127.0.0.1', server.port)
    assert entry['additional']['http'] == ('127.0.0.1', server.port)
    assert entry['status'] == 'ALIVE' and entry['shard'] == 2 and entry['metadata'] == {'dc': 'east'}
    assert read_synapse_backend(member, data)['port'] == server.port

    # A new registrar resumes its predecessor's session: the member stays.
    restart_registrar(server, stat.ephemeralOwner, f'{zk_path}/{member}')
    assert zk.get_children(zk_path) == [member]
    assert zk.exists(f'{zk_path}/{member}').czxid == stat.czxid
    replacement = member

    zk.delete(f'{zk_path}/{replacement}')
    [again] = wait_until(lambda: (c := zk.get_children(zk_path)) != [replacement] and c,
                         timeout=2, message='a new member')
    assert again > replacement


def test_curator_instance(servers, ini, zookeeper, zk):
    path = f'/tests/curator-{time.monotonic_ns()}/services/shop'
    server, _ = start_registered(servers, ini, zookeeper.hosts, path,
                                 'node_format = curator\nproperties = dc = east\n')
    [instance_id] = wait_until(lambda: zk.exists(path) and zk.get_children(path), message='an instance')
    value = read_curator_instance('shop', instance_id, zk.get(f'{path}/{instance_id}')[0])
    assert (value['address'], value['port']) == ('127.0.0.1', server.port)
    assert value['payload'] == {'dc': 'east'}
    assert abs(value['registrationTimeUTC'] / 1000 - time.time()) < 60
    zk.delete(f'{path}/{instance_id}')
    wait_until(lambda: zk.get_children(path) == [instance_id], timeout=2, message='the same id back')


def test_the_registrar_speaks_json_lines(zookeeper, zk, zk_path, tmp_path):
    """The master's view: state events on every change, 'unregistered' when
    asked, and end of file closing the session (nodes go at once)."""
    with open(tmp_path / 'registrar.log', 'wb') as log:
        registrar = subprocess.Popen([sys.executable, '-m', 'zkprefork.registrar'],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    events = selectors.DefaultSelector()
    events.register(registrar.stdout, selectors.EVENT_READ)

    def send(message):
        registrar.stdin.write(json.dumps(message).encode() + b'\n')
        registrar.stdin.flush()

    sessions = []

    def next_event(timeout=10):
        """The next event; session events (secret: the password) are set aside."""
        while True:
            assert events.select(timeout), 'no event in time'
            event = json.loads(registrar.stdout.readline())
            if event['event'] != 'session':
                return event
            sessions.append(event)
    try:
        config = make_settings({'zookeeper': zookeeper.hosts, 'path': zk_path, 'session_timeout': '4000'})
        registrar.stdin.write(RegistrarConfig.from_settings(config).line().encode())
        data = {'pid': os.getpid(), 'instance': 'i1', 'workers': 1, 'generation': 0}
        send({'op': 'register', 'endpoints': [['127.0.0.1', 8080], ['::1', 8080]], 'data': data})
        seen = [next_event()]
        while not seen[-1]['nodes']:
            seen.append(next_event())
        assert seen[0] == {'event': 'state', 'state': 'connecting', 'session': None, 'nodes': [],
                           'since': seen[0]['since'], 'problems': [], 'error': None, 'health': None}
        last = seen[-1]
        nodes = [f'{zk_path}/127.0.0.1:8080', f'{zk_path}/[::1]:8080']
        assert last['state'] == 'connected' and sorted(last['nodes']) == sorted(nodes)
        assert int(last['session'], 16) == zk.exists(nodes[0]).ephemeralOwner == sessions[-1]['id']
        assert len(bytes.fromhex(sessions[-1]['password'])) == 16
        assert abs(last['since'] - time.time()) < 10
        send({'op': 'unregister'})
        while next_event()['event'] != 'unregistered':
            pass
        assert zk.get_children(zk_path) == []
        send({'op': 'register', 'endpoints': [['127.0.0.1', 8080]], 'data': data})
        wait_until(lambda: zk.exists(nodes[0]), message='the node again')
        registrar.stdin.close()  # the master is gone
        assert registrar.wait(10) == 0
        assert not zk.exists(nodes[0])
    finally:
        registrar.kill()
        registrar.wait()


def first_times(checks, timeout):
    """{name: monotonic time its check first came true}, polling all every 5 ms."""
    seen = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(checks) and time.monotonic() < deadline:
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.monotonic()
        time.sleep(0.005)
    return seen


def port_closed(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
    except OSError:
        return True
    return False


def sigterm_during_an_outage(servers, ini, own_zookeeper, kazoo_client, zk_path):
    """A registered server (10 s session) whose ZooKeeper is stopped, then
    SIGTERM: (zookeeper, server, node)."""
    # The longest session this ZooKeeper allows: a restart of its JVM on a
    # loaded machine must stay well within it.
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    server, node = start_registered(servers, ini, ','.join([zookeeper.hosts] * 3), zk_path,
                                    'session_timeout = 20000\n')
    wait_owned(kazoo_client(zookeeper.hosts), node)
    zookeeper.stop()
    server.wait_for_log('ZooKeeper suspended')
    server.signal(signal.SIGTERM)
    return zookeeper, server, node


def test_unregister_while_zookeeper_is_down_waits_for_it(servers, ini, own_zookeeper, kazoo_client, zk_path):
    """SIGTERM during an outage: the master keeps accepting until the delete
    is confirmed, so the node goes before (or as) the port closes."""
    zookeeper, server, node = sigterm_during_an_outage(servers, ini, own_zookeeper, kazoo_client, zk_path)
    server.wait_for_log('SIGTERM: stopping gracefully')
    time.sleep(0.5)
    assert server.request('/')[0] == 200  # still accepting
    state_lines = re.findall(r'ZooKeeper \w+, session \S+, registered: .*', server.log())
    assert state_lines[-1].endswith(f'registered: {node}')  # ZooKeeper may still hold it
    zookeeper.start()
    zk = kazoo_client(zookeeper.hosts)
    seen = first_times({'gone': lambda: not zk.exists(node), 'closed': lambda: port_closed(server.port)},
                       timeout=10)
    assert seen['gone'] <= seen['closed'], seen
    assert server.wait() == 0
    assert 'did not confirm the deregistration in time' not in server.log()
    # Nothing claimed the node gone before ZooKeeper confirmed it: its
    # delete, or the close of its session (from a new client, when a probe
    # found ZooKeeper answering before the registrar's client reconnected).
    closed = 'closed the session (and its nodes) from a new client'
    claims = re.findall(rf'ZooKeeper \w+, session \S+, registered: .*|unregistered /\S+|{re.escape(closed)}',
                        server.log())
    named = claims.index(state_lines[-1])
    first_nothing = next(i for i, line in enumerate(claims) if i > named and line.endswith('registered: nothing'))
    assert claims[first_nothing - 1] in (f'unregistered {node}', closed), claims


def wipe(zookeeper):
    """Stop ZooKeeper, empty its data directory, start it on the same port."""
    zookeeper.stop()
    shutil.rmtree(os.path.join(zookeeper.directory, 'data'))
    zookeeper.start()


@pytest.mark.parametrize('node_format', ['zk', 'serverset', 'curator'])
def test_a_zookeeper_that_lost_its_data_gets_the_node_back(servers, ini, own_zookeeper, kazoo_client,
                                                           zk_path, node_format):
    zookeeper = own_zookeeper()
    server, _ = start_registered(servers, ini, ','.join([zookeeper.hosts] * 3), zk_path,
                                 f'session_timeout = 2000\nnode_format = {node_format}\n')
    zk = kazoo_client(zookeeper.hosts)
    [child] = wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    before = zk.get(f'{zk_path}/{child}')[0]
    zk.stop()
    wipe(zookeeper)
    answering = time.monotonic()
    zk = kazoo_client(zookeeper.hosts)
    [child] = wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), timeout=2.0 + 5.0,
                         message='the node back in the wiped ZooKeeper')
    assert time.monotonic() - answering < 2.0 + 5.0
    data, stat = zk.get(f'{zk_path}/{child}')
    assert stat.ephemeralOwner in zookeeper.session_ids()
    if node_format != 'curator':  # its registration time is the first registration's
        assert json.loads(data) == json.loads(before)
    else:
        assert data == before
    server.wait_for_log('starting a new session')
    assert server.request('/')[0] == 200


def own_data(node_format, raw):
    value = json.loads(raw)
    return value['zkprefork'] if node_format == 'serverset' else value


@pytest.mark.parametrize('node_format, credentials', [
    ('zk', False), ('serverset', False), ('curator', False), ('zk', True), ('serverset', True)])
def test_nodes_keep_their_identity(servers, ini, zookeeper, zk, kazoo_client, zk_path,
                                   node_format, credentials):
    """Name, czxid and member number survive HUP, TTIN, TTOU and a registrar
    restart; data changes in place; an anonymous client cannot change it."""
    options = f'node_format = {node_format}\nsession_timeout = 4000\n'
    env = None
    if credentials:
        options += 'zookeeper_credentials_env = ZKPF_TEST_CREDENTIALS\n'
        env = {'ZKPF_TEST_CREDENTIALS': 'app:' + os.urandom(8).hex()}
    server, _ = start_registered(servers, ini, zookeeper.hosts, zk_path, options, env=env)
    [child] = wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    node = f'{zk_path}/{child}'
    created = wait_until(lambda: zk.exists(node))
    seen = []
    ChildrenWatch(zk, zk_path, lambda children: seen.append(sorted(children)))

    def becomes(signum, key, value, after):
        logged = server.log().count('updated /')  # before the signal: its update may be quick
        server.signal(signum)
        if node_format == 'curator':  # no room for workers or generation: nothing to update
            server.wait_for_log(after)
            time.sleep(0.3)
        else:
            wait_until(lambda: own_data(node_format, zk.get(node)[0])[key] == value,
                       message=f'{key} = {value}')
            # The registrar logs an update just after ZooKeeper confirmed
            # it: killed in between, it would never say so.
            wait_until(lambda: server.log().count('updated /') > logged, message='the update logged')
    becomes(signal.SIGHUP, 'generation', 1, r'SIGHUP: reloading')
    becomes(signal.SIGTTIN, 'workers', 2, r'SIGTTIN: now 2')
    becomes(signal.SIGTTOU, 'workers', 1, r'SIGTTOU: now 1')
    restart_registrar(server, created.ephemeralOwner, node)
    # The new registrar may write the node: the same identity.
    becomes(signal.SIGTTIN, 'workers', 2, r'SIGTTIN: now 2')

    after = zk.exists(node)
    assert (after.czxid, after.ephemeralOwner) == (created.czxid, created.ephemeralOwner)
    assert seen == [[child]]  # no member left, none joined
    assert zk.get_children(zk_path) == [child]
    # In place, each time (a new registrar's curator registrationTimeUTC is its own).
    updates = 1 if node_format == 'curator' else 4
    wait_until(lambda: server.log().count('updated /') >= updates, timeout=2, message=f'{updates} updates')
    assert server.log().count('updated /') == updates, server.log()

    anonymous = kazoo_client(zookeeper.hosts)
    with pytest.raises(NoAuthError):
        anonymous.set(node, b'{}')
    if credentials:  # the service path is protected: nobody else may delete
        with pytest.raises(NoAuthError):
            anonymous.delete(node)
    else:  # ZooKeeper checks a delete against the parent's open ACL: it is made again
        anonymous.delete(node)
        wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node again')


class StallingProxy:
    """A TCP proxy to ZooKeeper that can, for a while, accept connections
    and never answer them, as ZooKeeper 3.8 does while it starts."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        self.stall_until = 0.0
        self.sockets = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self, seconds):
        """Drop every connection; accept new ones without answering for `seconds`."""
        self.stall_until = time.monotonic() + seconds
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def close(self):
        self.closed = True
        self.listener.close()
        self.stall(0)

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if time.monotonic() < self.stall_until:
                continue  # held open, never answered
            server = socket.create_connection(('127.0.0.1', self.target_port))
            self.sockets.append(server)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_a_zookeeper_that_answers_late_does_not_cost_the_session(servers, ini, zookeeper, zk, zk_path):
    """A reconnection that lands on a ZooKeeper that accepted it but does not
    answer (yet) gives up in time for another attempt within the session:
    kazoo alone would wait the whole session timeout with one server, and
    ZooKeeper would expire the session and delete the node meanwhile."""
    proxy = StallingProxy(zookeeper.port)
    try:
        server, node = start_registered(servers, ini, f'127.0.0.1:{proxy.port}', zk_path,
                                        'session_timeout = 4000\n')
        session = wait_owned(zk, node)
        proxy.stall(1.5)
        server.wait_for_log('ZooKeeper suspended')
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            assert owner(zk, node) == session, 'the session expired: the node went'
            time.sleep(0.01)
        assert server.log().count('ZooKeeper connected') >= 2
    finally:
        proxy.close()


def test_a_registrar_that_closed_its_session_is_followed_by_a_new_session(servers, ini, zookeeper, zk,
                                                                          zk_path):
    """The session a new registrar would resume is closed (its predecessor got
    SIGTERM): ZooKeeper says it expired, and the node is registered anew."""
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, 'session_timeout = 4000\n')
    first = wait_owned(zk, node)
    registrar_of(server).terminate()
    wait_owned(zk, node, other_than=first)
    assert zk.get_children(zk_path) == [node.rpartition('/')[2]]


@pytest.mark.parametrize('after_kill', [0.1, 0.8])
def test_sigterm_during_a_restart_of_the_session_owner_deletes_the_node_first(servers, ini, zookeeper, zk, zk_path,
                                                                    after_kill):
    """The registrar killed, SIGTERM before (0.1 s) or just after (0.8 s) its
    successor starts: one is started at once to resume the session and
    delete the node before the port closes; no state line claims nothing
    while the session holds the node."""
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, 'session_timeout = 4000\n')
    wait_owned(zk, node)
    os.kill(registrar_of(server).pid, signal.SIGKILL)
    time.sleep(after_kill)
    server.signal(signal.SIGTERM)
    seen = first_times({'gone': lambda: not zk.exists(node), 'closed': lambda: port_closed(server.port)},
                       timeout=10)
    assert seen['gone'] <= seen['closed'], seen
    assert seen['closed'] - seen['gone'] < 2.0  # deleted, not expired with the session
    assert server.wait() == 0
    successor = server.log().partition('killed by SIGKILL')[2]
    claims = re.findall(r'ZooKeeper \w+, session \S+, registered: .*|unregistered /\S+', successor)
    deleted = claims.index(f'unregistered {node}')
    assert not any(line.endswith('registered: nothing') for line in claims[:deleted]), claims


def test_a_crash_loop_of_the_session_owner_keeps_resuming_the_session(servers, ini, zookeeper, zk, zk_path):
    """Registrars killed one after another: the restart back-off stays short
    enough for each successor to resume the session, so the node never goes."""
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, 'session_timeout = 4000\n')
    session = wait_owned(zk, node)
    created = zk.exists(node)
    with gaps_of(zk, node) as gaps:
        for _ in range(5):  # back-offs of 0.5, 1, 2, 4, 8 s uncapped
            restart_registrar(server, session, node)
    assert gaps == []
    assert zk.exists(node).czxid == created.czxid
    assert log_times(server, 'restarting it in 1.0 s')
    assert not log_times(server, 'restarting it in 2.0 s')


def test_node_goes_as_soon_as_zookeeper_answers_after_a_long_outage_across_sigterm(
        servers, ini, own_zookeeper, kazoo_client, zk_path):
    """ZooKeeper down across SIGTERM for longer than the 5 s the master keeps
    accepting: the port closes then, and the node goes as soon as ZooKeeper
    answers again (the registrar still closes the session), not a session
    timeout later; the master exits once that is done."""
    zookeeper, server, node = sigterm_during_an_outage(servers, ini, own_zookeeper, kazoo_client, zk_path)
    server.wait_for_log('did not confirm the deregistration in time')
    wait_until(lambda: port_closed(server.port), message='the port to close')
    server.wait_for_log('ZooKeeper unreachable at exit')
    time.sleep(1.0)
    assert server.alive()
    zookeeper.start()
    answering = time.monotonic()
    zk = kazoo_client(zookeeper.hosts)
    wait_until(lambda: not zk.exists(node), timeout=10, interval=0.01, message='the node to go')
    # Reconnection back-off (2.8 s at worst) and a connect, well within the
    # 10 s session that ZooKeeper re-arms at its restart.
    assert time.monotonic() - answering < 5.0
    assert server.wait(10) == 0
    assert 'killing it' not in server.log()


def test_an_unresolvable_zookeeper_is_named_once_not_ten_times_a_second(servers, ini, zk_path):
    server = servers(ini(f'zookeeper = no-such-host.invalid:2181\npath = {zk_path}\n'
                         'host = 127.0.0.1\n')).wait_serving()
    server.wait_for_log('Cannot resolve no-such-host.invalid')
    time.sleep(3.0)
    assert server.request('/')[0] == 200
    assert server.log().count('Cannot resolve') == 1, server.log()


def test_sigterm_as_zookeeper_returns_deletes_the_node_at_once(servers, ini, own_zookeeper, kazoo_client,
                                                               zk_path):
    """ZooKeeper back, serving, while the registrar's client still sleeps
    out its reconnection back-off (up to 2.8 s once down for a while):
    SIGTERM then. The registrar probes at once and, ZooKeeper answering,
    closes the session from a new client: the node goes within 0.5 s (kazoo
    reconnects 0-2.8 s later), long before the port closes (which waits up to 5 s for it)."""
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, 'session_timeout = 20000\n')
    zk_before = kazoo_client(zookeeper.hosts)
    wait_owned(zk_before, node)
    zookeeper.stop()
    server.wait_for_log('ZooKeeper suspended')
    time.sleep(3.0)  # the scenario: the back-off at its longest
    zookeeper.start()
    server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    zk = kazoo_client(zookeeper.hosts)
    seen = first_times({'gone': lambda: not zk.exists(node), 'closed': lambda: port_closed(server.port)},
                       timeout=10)
    assert seen['gone'] - signalled < 0.5 and seen['gone'] <= seen['closed'], (seen, signalled)
    assert server.wait() == 0
    assert 'did not confirm the deregistration in time' not in server.log()
