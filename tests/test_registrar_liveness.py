"""A registrar replaced, against real processes and a real ZooKeeper: one
that stopped answering (SIGSTOP) is reported as unknown, killed and
replaced, one waiting on ZooKeeper is not; a replacement can do what the
registrar it replaces could (the credentials as last validated, even once
the file is gone) and gets the settings of the last good reload."""
import json
import os
import re
import selectors
import signal
import time

import pytest

from support import node_data, registrar_of, wait_until
from test_operations import ask, monitor_of
from test_registrar_faults import gone, lone_registrar  # noqa: F401 (a fixture)
from test_registration import first_times, port_closed, restart_registrar, start_registered, wait_owned
from zkprefork.master.heartbeat import START_GRACE, Heartbeat
from zkprefork.registrar import security as zksecurity
from zkprefork.registrar.protocol import Ping, Pong, ProtocolError, read_command, read_event

pytestmark = pytest.mark.timeout(120)

PASSWORD = 'pw-liveness-7f3a'
SESSION = 'session_timeout = 4000\n'  # seconds: pings every 1, unknown after 2, killed after 8


def registration(server):
    return json.loads(ask(monitor_of(server), b'status\n'))['registration']


def metric_lines(server, prefix):
    return [line for line in ask(monitor_of(server), b'metrics\n').splitlines() if line.startswith(prefix)]


def next_event(registrar, kind, timeout=10.0):
    """The next event of `kind` from a LoneRegistrar's stdout (others skipped)."""
    with selectors.DefaultSelector() as selector:
        selector.register(registrar.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while selector.select(max(0.0, deadline - time.monotonic())):
            event = json.loads(registrar.process.stdout.readline())
            if event['event'] == kind:
                return event
    raise AssertionError(f'no {kind} event in {timeout} s:\n{registrar.log()}')


def test_ping_and_pong_lines():
    assert read_command(Ping(3).line()) == Ping(3)
    assert read_event(Pong(3).line()) == {'event': 'pong', 'seq': 3}
    for line in ('{"op": "ping"}', '{"op": "ping", "seq": "3"}', '{"op": "ping", "seq": true}'):
        with pytest.raises(ProtocolError, match='ping: no integer seq'):
            read_command(line)


def test_heartbeat_bounds_follow_the_session_timeout():
    """Times in seconds from an arbitrary origin; session timeout 4 s."""
    beat = Heartbeat(4.0)
    assert (beat.every, beat.stale_after, beat.kill_after) == (1.0, 2.0, 8.0)
    assert Heartbeat(0.4).kill_after == 5.0  # one request's wait (2 s at least) and the margin
    beat.started(100.0)
    assert beat.ping(100.0) == Ping(1) and beat.ping(100.5) is None  # one unanswered at a time
    assert beat.deadline(100.5) == 100.0 + START_GRACE + 2.0  # a new registrar's grace
    beat.answered(1, 101.0)
    assert not beat.stale(101.0) and beat.deadline(101.0) == 102.0
    assert beat.ping(101.9) is None and beat.ping(102.0) == Ping(2)
    beat.answered(1, 102.5)  # an old answer proves nothing
    assert beat.stale(104.0) and not beat.dead(109.9) and beat.dead(110.0)
    assert beat.deadline(105.0) == 110.0 and beat.deadline(110.0) == float('inf')
    beat.stopped()
    assert beat.ping(200.0) is None and not beat.dead(200.0)


def test_pings_are_answered_by_the_loop_also_while_zookeeper_is_down(own_zookeeper, zk_path,
                                                                      lone_registrar):  # noqa: F811
    zookeeper = own_zookeeper()
    registrar = lone_registrar(zookeeper, zk_path, 4000)
    registrar.send({'op': 'ping', 'seq': 1})
    assert next_event(registrar, 'pong') == {'event': 'pong', 'seq': 1}
    zookeeper.stop()
    for seq in (2, 3):
        time.sleep(1.0)
        registrar.send({'op': 'ping', 'seq': seq})
        assert next_event(registrar, 'pong') == {'event': 'pong', 'seq': seq}


def test_a_frozen_registrar_is_reported_unknown_then_killed_and_replaced(servers, ini, zookeeper, zk,
                                                                         zk_path):
    """SIGSTOP, longer than the session timeout: within the session timeout
    the status and the metrics stop saying 'connected' with the node (which
    ZooKeeper drops then); the master kills the registrar and starts
    another, which registers the node again."""
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path,
                                    SESSION + 'monitor_server = 127.0.0.1:0\n')
    first = wait_owned(zk, node)
    wait_until(lambda: registration(server)['nodes'] == [node], message='the node in the status')
    frozen = registrar_of(server)
    frozen.suspend()
    stopped = time.monotonic()
    wait_until(lambda: registration(server)['state'] == 'unknown', timeout=6, interval=0.05,
               message="the registration reported as 'unknown'")
    noticed = time.monotonic() - stopped
    said = registration(server)
    assert noticed < 4.0, f"said 'unknown' {noticed:.1f} s after SIGSTOP (session timeout: 4 s)"
    assert said['nodes'] == [] and re.fullmatch(rf'the registrar \(pid {frozen.pid}\) has not answered '
                                                r'for \d+\.\d s', said['error']), said
    assert metric_lines(server, 'zkprefork_registration_state{state="unknown"}') == [
        'zkprefork_registration_state{state="unknown"} 1.0']
    assert metric_lines(server, 'zkprefork_registered_nodes') == ['zkprefork_registered_nodes 0.0']

    wait_until(lambda: gone(frozen), timeout=12, message='the frozen registrar to be killed')
    killed = time.monotonic() - stopped
    assert 4.0 < killed < 12.0, killed
    assert f'the registrar (pid {frozen.pid}) has not answered for' in server.log()
    successor = registrar_of(server)
    assert successor.pid != frozen.pid
    wait_owned(zk, node, other_than=first, timeout=15)  # the frozen session expired with its node
    wait_until(lambda: registration(server)['nodes'] == [node], timeout=10, message='the node reported again')
    assert registration(server)['state'] == 'connected'
    assert server.stop() == 0


def test_a_registrar_waiting_on_zookeeper_is_not_killed(servers, ini, own_zookeeper, kazoo_client,
                                                        zk_path):
    """ZooKeeper down for longer than the heartbeat's bound (8 s here): the
    registrar's loop keeps answering; the same registrar registers again."""
    zookeeper = own_zookeeper()
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, SESSION)
    wait_owned(kazoo_client(zookeeper.hosts), node)
    registrar = registrar_of(server)
    zookeeper.stop()
    server.wait_for_log('ZooKeeper suspended')
    time.sleep(10.0)  # the scenario: longer than the bound
    assert 'has not answered' not in server.log()
    assert not gone(registrar) and registrar_of(server).pid == registrar.pid
    zookeeper.start()
    wait_owned(kazoo_client(zookeeper.hosts, timeout=20), node, timeout=20)
    assert registrar_of(server).pid == registrar.pid
    assert server.stop() == 0


def credentials_server(servers, ini, zookeeper, zk_path, credentials, options=''):
    return start_registered(servers, ini, zookeeper.hosts, zk_path,
                            f'{SESSION}zookeeper_credentials_file = {credentials}\n{options}')


def test_a_registrar_restarted_after_the_credentials_file_went_still_deletes_the_node(
        servers, ini, tmp_path, zookeeper, zk, zk_path):
    """The file deleted (a secret unmounted), then the registrar killed: its
    successor resumes the session with the credentials the master validated,
    and a graceful stop deletes the node before the port closes."""
    credentials = tmp_path / 'credentials'
    credentials.write_text(f'app:{PASSWORD}\n')
    server, node = credentials_server(servers, ini, zookeeper, zk_path, credentials)
    session = wait_owned(zk, node)
    credentials.unlink()
    restart_registrar(server, session, node)
    server.signal(signal.SIGTERM)
    seen = first_times({'gone': lambda: not zk.exists(node), 'closed': lambda: port_closed(server.port)},
                       timeout=10)
    assert seen['gone'] <= seen['closed'], seen
    assert server.wait() == 0
    assert 'cannot read the ZooKeeper credentials' not in server.log()
    assert PASSWORD not in server.log()


def test_a_registrar_restarted_after_a_reload_uses_the_credentials_of_that_reload(
        servers, ini, tmp_path, zookeeper, kazoo_client, zk_path):
    """Wrong credentials at start (ZooKeeper refuses them); the file is
    replaced by one with the right ones, SIGHUP, then the file goes and the
    registrar is killed: its successor registers with the reload's."""
    right = zksecurity.Credentials('app', PASSWORD, 'digest')
    owner = kazoo_client(zookeeper.hosts, auth_data=[('digest', f'app:{PASSWORD}')])
    owner.create(zk_path, acl=zksecurity.acls(right)[0], makepath=True)
    credentials = tmp_path / 'credentials'
    credentials.write_text('app:not-the-password\n')
    server, node = credentials_server(servers, ini, zookeeper, zk_path, credentials)
    server.wait_for_log("ZooKeeper refused digest user 'app' to register")
    rotated = tmp_path / 'credentials.new'
    rotated.write_text(f'app:{PASSWORD}\n')
    os.replace(rotated, credentials)  # as a secret is rotated: a new file in its place
    server.signal(signal.SIGHUP)
    server.wait_for_log('SIGHUP: reloading')
    credentials.unlink()
    registrar = registrar_of(server)
    registrar.kill()
    wait_until(lambda: owner.exists(node), timeout=15, message='registration by the successor')
    assert 'cannot read the ZooKeeper credentials' not in server.log()
    assert PASSWORD not in server.log()
    assert server.stop() == 0


def test_a_stop_replaces_a_frozen_registrar_to_delete_the_node_before_the_port_closes(
        servers, ini, own_zookeeper, kazoo_client, zk_path):
    """The default session timeout (10 s, longer than the stop's 5 s wait
    for the delete): a registrar frozen (SIGSTOP) when SIGTERM comes would
    leave the node to ZooKeeper's expiry, seconds after the port closed.
    Silent 1.5 s into the stop, it is killed; its successor resumes the
    session and deletes the node, before the port closes."""
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    zk = kazoo_client(zookeeper.hosts)
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path, 'session_timeout = 10000\n')
    session = wait_owned(zk, node)
    frozen = registrar_of(server)
    frozen.suspend()
    server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    seen = first_times({'gone': lambda: not zk.exists(node), 'closed': lambda: port_closed(server.port)},
                       timeout=10)
    assert seen['gone'] <= seen['closed'] < signalled + 6.0, (seen, signalled, server.log())
    assert server.wait() == 0
    assert gone(frozen)
    log = server.log()
    assert f'the registrar (pid {frozen.pid}) has not answered for' in log
    assert f'0x{session:x}' in log.split('has not answered for')[1]
    assert 'did not confirm the deregistration' not in log


def test_credentials_rewritten_in_place_then_a_registrar_restart_closes_the_session(
        servers, ini, tmp_path, own_zookeeper, kazoo_client, zk_path):
    """The file the master holds open turned to garbage (rewritten in
    place), then the registrar killed: the successor cannot authenticate,
    says so, and closes the session it was to resume, so that ZooKeeper
    holds no node while the status says none (not for the 10 s until the
    session would expire); the file mended, a reload registers again."""
    zookeeper = own_zookeeper(extra='maxSessionTimeout=20000\n')
    zk = kazoo_client(zookeeper.hosts)
    credentials = tmp_path / 'credentials'
    credentials.write_text(f'app:{PASSWORD}\n')
    server, node = start_registered(servers, ini, zookeeper.hosts, zk_path,
                                    f'zookeeper_credentials_file = {credentials}\n'
                                    'monitor_server = 127.0.0.1:0\nsession_timeout = 10000\n')
    session = wait_owned(zk, node)
    with open(credentials, 'r+') as same_inode:
        same_inode.write('garbage-no-colon\n')
        same_inode.truncate()
    registrar_of(server).kill()
    wait_until(lambda: not zk.exists(node), timeout=6, message="the node gone with the session's close")
    wait_until(lambda: registration(server)['state'] == 'failed', message="the registration 'failed'")
    assert registration(server)['nodes'] == []
    assert f'closed session 0x{session:x}' in server.log()
    assert 'does not hold credentials of the form user:password' in server.log()
    credentials.write_text(f'app:{PASSWORD}\n')  # mended; the reload holds it anew
    server.signal(signal.SIGHUP)
    wait_until(lambda: zk.exists(node), timeout=15, message='the node back after the reload')
    wait_until(lambda: registration(server)['nodes'] == [node], message='the node in the status')
    assert PASSWORD not in server.log()
    assert server.stop() == 0


def test_a_stop_hurries_the_heartbeat():
    """Times in seconds from an arbitrary origin; session timeout 10 s."""
    beat = Heartbeat(10.0)
    beat.started(100.0)
    beat.ping(100.0)
    beat.answered(1, 100.1)  # the next ping would go at 102.6
    beat.hurry(101.0)
    assert beat.ping(101.0) == Ping(2)
    assert not beat.dead(102.4) and beat.dead(102.5)


def test_a_stop_whose_delete_zookeeper_refuses_closes_the_session_first(
        servers, ini, tmp_path, zookeeper, zk, zk_path):
    """A wrong password rotated in (a new file renamed over the old one),
    SIGHUP, then the registrar dies: its successor resumes the session, but
    the path's ACL refuses it the delete at SIGTERM. It closes the session
    instead (ZooKeeper deletes a closed session's nodes whatever their ACL):
    the node goes before the port closes, without the stop's 5 s wait."""
    credentials = tmp_path / 'credentials'
    credentials.write_text(f'app:{PASSWORD}\n')
    server, node = credentials_server(servers, ini, zookeeper, zk_path, credentials)
    session = wait_owned(zk, node)
    rotated = tmp_path / 'credentials.new'
    rotated.write_text('app:not-the-password\n')
    os.replace(rotated, credentials)
    server.signal(signal.SIGHUP)
    server.wait_for_log('SIGHUP: reloading')
    # The reload's data written by the registrar that may (else the next
    # one, refused the update, never says it holds the node).
    wait_until(lambda: node_data(zk, node)['generation'] == 1, message="the reload's data in the node")
    restart_registrar(server, session, node)
    server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    seen = first_times({'gone': lambda: not zk.exists(node), 'closed': lambda: port_closed(server.port)},
                       timeout=10)
    assert seen['gone'] <= seen['closed'] < signalled + 3.0, (seen, signalled)
    assert server.wait() == 0
    assert 'closing the session, which deletes its nodes' in server.log()
    assert 'did not confirm the deregistration' not in server.log()
