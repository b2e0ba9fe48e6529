"""Live upgrade (SIGUSR2, issue 20), with a real ZooKeeper, real masters
and real clients: a new master takes over the socket and the node (same
znode, same czxid, same session), the old one retires and exits 0; every
failure leaves the old master serving and registered."""
import json
import os
import re
import signal
import socket
import struct
import time

import psutil
import pytest
from kazoo.exceptions import NoNodeError

from support import Background, Load, free_port, kill_tree, node_data, wait_until
from test_reload import app_module  # noqa: F401 (a fixture: the application, rewritten to upgrade it)
from test_registration import gaps_of
from zkprefork.testing import IdleClients, NewConnections, four_letter_word, http_get

NEW_MASTER = r'started a new master \(pid (\d+)\)'


@pytest.fixture
def new_masters():
    """The pids of the masters started by upgrades: killed with their
    descendants at the end (the old master's own kill reaches only those
    still in its process group)."""
    pids = []
    yield pids
    for pid in pids:
        kill_tree(pid)


@pytest.fixture
def config(ini, zookeeper, zk_path, tmp_path):
    """config(options) writes the ini file a master reads (again on USR2)."""
    def write(options='', node_format='zk', workers=2, path=zk_path):
        return ini(f'host = 127.0.0.1\nworkers = {workers}\nzookeeper = {zookeeper.hosts}\npath = {path}\n'
                   f'node_format = {node_format}\npidfile = {tmp_path / "zkprefork.pid"}\n{options}',
                   app='call:versioned_app:factory')
    return write


@pytest.fixture
def start(servers, config, tmp_path, app_module):
    env = {'PYTHONPATH': str(tmp_path), 'PYTHONDONTWRITEBYTECODE': '1'}

    def start(options='', node_format='zk'):
        return servers(config(options, node_format), env=env).wait_serving()
    return start


def wait_for_node(zk, zk_path):
    [child] = wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), message='the node')
    return f'{zk_path}/{child}'


def gone(pid):
    """The process has exited (a zombie waiting for init counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def family(pid):
    """`pid` and its live descendants."""
    try:
        return {pid} | {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def new_master_started(server, attempts_before, new_masters):
    """The pid of the new master that the attempt after `attempts_before` started."""
    def started():
        found = re.findall(NEW_MASTER, server.log())
        return len(found) > attempts_before and int(found[attempts_before])
    pid = wait_until(started, message='a new master')
    new_masters.append(pid)
    return pid


def upgrade(server, new_masters, old_pid=None):
    """USR2 to the old master (`server`'s, or `old_pid`); returns the new
    master's pid once the old one has exited, with status 0."""
    attempts = len(re.findall(NEW_MASTER, server.log()))
    if old_pid is None:
        server.signal(signal.SIGUSR2)
    else:
        os.kill(old_pid, signal.SIGUSR2)
    new = new_master_started(server, attempts, new_masters)
    if old_pid is None:
        assert server.wait(30) == 0
    else:
        wait_until(lambda: gone(old_pid), timeout=30, message=f'the old master (pid {old_pid}) to exit')
    return new


def stop(pid, zk, node):
    """SIGTERM the master `pid`: it and all its processes go, and its node."""
    pids = family(pid)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: all(gone(p) for p in pids), timeout=15, message=f'master {pid} and its children to exit')
    assert zk.exists(node) is None


def answered_by(port, master):
    """The pid of the worker that answered a request on a new connection,
    checked to be one of `master`'s."""
    status, body = http_get(port)
    assert status == 200
    pid = int(body.split()[1])
    assert pid in family(master)
    return pid


@pytest.mark.parametrize('node_format', ['zk', 'serverset', 'curator'])
def test_usr2_hands_socket_and_node_to_a_new_master(start, zk, zk_path, tmp_path, new_masters, node_format):
    server = start(node_format=node_format)
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    old = family(server.pid)
    assert len(old) == 4  # master, registrar, 2 workers
    pidfile = tmp_path / 'zkprefork.pid'
    oldbin = tmp_path / 'zkprefork.pid.oldbin'
    assert int(pidfile.read_text()) == server.pid

    server.signal(signal.SIGUSR2)
    new = new_master_started(server, 0, new_masters)
    # The overlap: the old master's pid is set aside while the new one boots.
    assert int(oldbin.read_text()) == server.pid
    assert server.wait(30) == 0

    assert [pid for pid in old if not gone(pid)] == []
    assert int(pidfile.read_text()) == new
    assert not oldbin.exists()
    after = zk.exists(node)
    assert zk.get_children(zk_path) == [node.rpartition('/')[2]]
    assert (after.czxid, after.ephemeralOwner) == (before.czxid, before.ephemeralOwner)
    if node_format == 'zk':
        assert node_data(zk, node)['pid'] == new
    answered_by(server.port, new)
    stop(new, zk, node)
    assert not pidfile.exists()


def test_usr2_under_load_fails_no_request(start, zk, zk_path, new_masters):
    server = start('threads = 4\n')
    node = wait_for_node(zk, zk_path)
    children_seen = []
    zk.ChildrenWatch(zk_path, lambda children: children_seen.append(sorted(children)))
    with Load(server.port, clients=8) as kept, NewConnections(server.port, 4) as fresh, \
            IdleClients(server.port, 8) as idle:
        kept.wait_for(200)
        new = upgrade(server, new_masters)
        answered_by(server.port, new)
        kept.wait_for(200)
        # Every idle client has sent at least one request since: on its old
        # connection (answered with Connection: close) or a new one.
        time.sleep(1.0)
    print(f'USR2 under load: {kept.ok} keep-alive, {fresh.ok} new-connection, '
          f'{idle.ok} idle-between responses')
    assert (kept.failures, fresh.failures, idle.failures) == ([], [], [])
    assert fresh.ok > 0 and idle.ok > 0
    assert {int(body.split()[1]) for body in kept.bodies} & family(new)
    assert all(children for children in children_seen), f'the node left ZooKeeper: {children_seen}'
    stop(new, zk, node)


def failed_upgrade(server, new_masters, kill_at=None):
    """USR2; waits for the one log line saying why the upgrade failed and
    returns it. `kill_at`: a log pattern at which the new master is SIGKILLed."""
    attempts = len(re.findall(NEW_MASTER, server.log()))
    failures = server.log().count('upgrade failed')
    marks = kill_at and len(re.findall(kill_at, server.log()))
    server.signal(signal.SIGUSR2)
    new = new_master_started(server, attempts, new_masters)
    if kill_at:
        wait_until(lambda: len(re.findall(kill_at, server.log())) > marks, message=repr(kill_at))
        os.kill(new, signal.SIGKILL)
    wait_until(lambda: server.log().count('upgrade failed') > failures, timeout=30, message='the failure')
    wait_until(lambda: all(gone(pid) for pid in family(new)), message='the new master and its children to go')
    return server.log().split('upgrade failed')[-1].splitlines()[0]


def assert_serves_as_before(server, zk, node, before, tmp_path):
    """The old master serves on, with its node (same znode, czxid and
    session), its pidfile back in place."""
    assert server.alive()
    answered_by(server.port, server.pid)
    wait_until(lambda: node_data(zk, node)['pid'] == server.pid, message='the node to name the old master')
    after = zk.exists(node)
    assert (after.czxid, after.ephemeralOwner) == (before.czxid, before.ephemeralOwner)
    # Put back once no registrar of the new master may hold the session.
    wait_until(lambda: not (tmp_path / 'zkprefork.pid.oldbin').exists(), message='the pidfile back')
    assert int((tmp_path / 'zkprefork.pid').read_text()) == server.pid


def test_a_bad_config_fails_the_upgrade_and_the_next_one_works(start, config, zk, zk_path, tmp_path,
                                                              new_masters):
    server = start()
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    config(workers=0)
    why = failed_upgrade(server, new_masters)
    assert 'exit status 2' in why and 'configuration is not valid' in why
    assert "workers: '0'" in server.log()
    assert_serves_as_before(server, zk, node, before, tmp_path)
    config(workers=3)
    new = upgrade(server, new_masters)
    wait_until(lambda: len(family(new)) == 5, message='3 workers and a registrar')
    assert zk.exists(node).czxid == before.czxid
    stop(new, zk, node)


def test_an_app_that_fails_to_import_fails_the_upgrade(start, app_module, zk, zk_path, tmp_path, new_masters):
    server = start()
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    app_module(boot='raise RuntimeError("deploy went wrong")')
    why = failed_upgrade(server, new_masters)
    assert 'exit status 1' in why
    assert 'deploy went wrong' in server.log()
    assert_serves_as_before(server, zk, node, before, tmp_path)
    app_module('v2')
    new = upgrade(server, new_masters)
    assert http_get(server.port)[1].startswith(b'v2 ')
    assert zk.exists(node).czxid == before.czxid
    stop(new, zk, node)


@pytest.mark.parametrize('kill_at', [
    r'taking over from the old master',  # booting
    r'leaving session \S+ open for the next registrar',  # the session on its way to the new master
], ids=['booting', 'handing'])
def test_a_new_master_killed_mid_upgrade_changes_nothing(start, zk, zk_path, tmp_path, new_masters, kill_at):
    server = start()
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    why = failed_upgrade(server, new_masters, kill_at)
    assert 'killed by SIGKILL' in why
    assert_serves_as_before(server, zk, node, before, tmp_path)
    new = upgrade(server, new_masters)
    assert zk.exists(node).czxid == before.czxid
    stop(new, zk, node)


def test_a_new_master_killed_while_its_registrar_holds_the_session(start, zk, zk_path, tmp_path, new_masters):
    """The old master takes its session back only once the dead new
    master's registrar, which holds it, has exited (here: frozen, then
    let go)."""
    server = start()
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    server.signal(signal.SIGUSR2)
    new = new_master_started(server, 0, new_masters)
    # Told before the registrar gets its configuration (a registrar killed
    # earlier never learns the session): frozen while Python starts.
    held = int(server.wait_for_log(r"the new master's registrar is pid (\d+)").group(1))
    os.kill(held, signal.SIGSTOP)
    try:
        os.kill(new, signal.SIGKILL)
        server.wait_for_log('upgrade failed.*killed by SIGKILL')
        time.sleep(0.5)  # the scenario: the old master waits for the frozen registrar
        assert 'taking the ZooKeeper session back' not in server.log()
    finally:
        os.kill(held, signal.SIGCONT)
    server.wait_for_log('taking the ZooKeeper session back')
    assert gone(held)
    assert_serves_as_before(server, zk, node, before, tmp_path)
    new = upgrade(server, new_masters)
    assert zk.exists(node).czxid == before.czxid
    stop(new, zk, node)


@pytest.mark.parametrize('frozen', [False, True], ids=['at-once', 'registrar-frozen'])
def test_sigterm_to_the_new_master_holding_the_session_hands_it_back(start, zk, zk_path, tmp_path,
                                                                    new_masters, frozen):
    """SIGTERM to the new master once its registrar resumes the handed-over
    session (at once, or with that registrar frozen until after the signal,
    so that it registers while its master stops): a failed upgrade, which
    changes nothing. The stop does not delete the node (it is still the old
    master's), nor does it let the old master retire: readers see no gap."""
    server = start()
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    with gaps_of(zk, node) as gaps:
        server.signal(signal.SIGUSR2)
        new = new_master_started(server, 0, new_masters)
        registrar = int(server.wait_for_log(r"the new master's registrar is pid (\d+)").group(1))
        if frozen:
            os.kill(registrar, signal.SIGSTOP)
        os.kill(new, signal.SIGTERM)
        if frozen:
            time.sleep(0.3)
            os.kill(registrar, signal.SIGCONT)
        server.wait_for_log('upgrade failed.*(it was stopped|was stopped while taking over)')
        wait_until(lambda: all(gone(pid) for pid in family(new)), message='the new master and its children')
        server.wait_for_log('taking the ZooKeeper session back')
        assert_serves_as_before(server, zk, node, before, tmp_path)
    assert gaps == []
    stop(server.pid, zk, node)


def names(zk, node, pid):
    """Whether `node` exists and names the master `pid` (it may be replaced meanwhile)."""
    try:
        return node_data(zk, node)['pid'] == pid
    except NoNodeError:
        return False


def test_the_old_master_killed_mid_upgrade_leaves_no_oldbin(start, zk, zk_path, tmp_path, new_masters):
    """SIGKILL to the old master before it handed its session over: the new
    master registers with a session of its own, and removes the
    `.oldbin` that names the dead master."""
    server = start()
    node = wait_for_node(zk, zk_path)
    server.signal(signal.SIGUSR2)
    new = new_master_started(server, 0, new_masters)
    server.signal(signal.SIGKILL)
    server.wait()
    wait_until(lambda: names(zk, node, new), timeout=20, message='the node to name the new master')
    wait_until(lambda: not (tmp_path / 'zkprefork.pid.oldbin').exists(), message='no .oldbin')
    assert int((tmp_path / 'zkprefork.pid').read_text()) == new
    stop(new, zk, node)


def test_credentials_the_node_refuses_fail_the_upgrade(start, zk, zk_path, tmp_path, new_masters):
    """The credentials file replaced by one of another password, then USR2:
    the new master's registrar resumes the session but the node's ACL
    refuses it the update. A failed upgrade: one line that says why, the
    old master serves on with its node; with the file put back, USR2 works."""
    credentials = tmp_path / 'credentials'
    credentials.write_text('app:first-secret\n')
    server = start(f'zookeeper_credentials_file = {credentials}\n')
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    replacement = tmp_path / 'credentials.new'
    replacement.write_text('app:second-secret\n')
    os.replace(replacement, credentials)
    why = failed_upgrade(server, new_masters)
    assert "could not register: ZooKeeper refused digest user 'app'" in why, why
    server.wait_for_log('taking the ZooKeeper session back')
    assert_serves_as_before(server, zk, node, before, tmp_path)
    credentials.write_text('app:first-secret\n')
    new = upgrade(server, new_masters)
    assert zk.exists(node).czxid == before.czxid
    assert 'second-secret' not in server.log() and 'first-secret' not in server.log()
    stop(new, zk, node)


def test_new_code_that_fails_the_health_check_fails_the_upgrade(start, app_module, zk, zk_path, tmp_path,
                                                                new_masters):
    """With a health check: the new master's checks fail (its /health
    answers 500); it gives up once they say DOWN, without touching the
    node the session kept for the old master (no gap, same czxid), and the
    old master serves on. Code that passes its checks then takes over."""
    server = start('health_check = /health\nhealth_check_interval = 0.2\n')
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    failing = (tmp_path / 'versioned_app.py').read_text().replace(
        "        body = (", "        if environ['PATH_INFO'] == '/health':\n"
                           "            start_response('500 Internal Server Error', [('Content-Length', '0')])\n"
                           "            return [b'']\n        body = (")
    (tmp_path / 'versioned_app.py').write_text(failing)
    with gaps_of(zk, node) as gaps:
        why = failed_upgrade(server, new_masters)
        server.wait_for_log('taking the ZooKeeper session back')
        assert_serves_as_before(server, zk, node, before, tmp_path)
    assert 'could not register: its health check /health says DOWN (last: HTTP 500)' in why, why
    assert gaps == []
    app_module('v2')
    new = upgrade(server, new_masters)
    assert zk.exists(node).czxid == before.czxid
    assert http_get(server.port)[1].split()[0] == b'v2'
    stop(new, zk, node)


def test_signals_to_a_new_master_from_its_first_instruction_are_not_fatal(start, zk, zk_path, new_masters):
    """HUP and USR1 sent to the new master the moment it is started (while
    Python starts and imports): they wait, blocked from its exec on, for
    its signal queue; the default action would kill it (a failed upgrade)."""
    server = start()
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    server.signal(signal.SIGUSR2)
    new = new_master_started(server, 0, new_masters)
    os.kill(new, signal.SIGHUP)
    os.kill(new, signal.SIGUSR1)
    assert server.wait(30) == 0
    assert 'upgrade failed' not in server.log()
    answered_by(server.port, new)
    assert zk.exists(node).czxid == before.czxid
    stop(new, zk, node)


def test_a_second_usr2_during_an_upgrade_is_ignored(start, zk, zk_path, new_masters):
    server = start()
    node = wait_for_node(zk, zk_path)
    server.signal(signal.SIGUSR2)
    new = new_master_started(server, 0, new_masters)
    server.signal(signal.SIGUSR2)
    server.signal(signal.SIGHUP)
    server.wait_for_log('SIGUSR2: an upgrade is already running')
    server.wait_for_log('SIGHUP: ignored during an upgrade')
    assert server.wait(30) == 0
    assert 'SIGHUP: reloading' not in server.log()
    assert len(re.findall(NEW_MASTER, server.log())) == 1
    answered_by(server.port, new)
    stop(new, zk, node)


@pytest.mark.parametrize('when', [r'taking over from the old master', r'left its session to the new master'],
                         ids=['booting', 'handing'])
def test_sigterm_to_the_old_master_mid_upgrade_stops_both(start, zk, zk_path, tmp_path, new_masters, when):
    server = start()
    node = wait_for_node(zk, zk_path)
    old = family(server.pid)
    server.signal(signal.SIGUSR2)
    new = new_master_started(server, 0, new_masters)
    server.wait_for_log(when)
    both = old | family(new)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    wait_until(lambda: all(gone(pid) for pid in both), message='every process of both masters to exit')
    assert zk.exists(node) is None
    assert 'upgrade failed' not in server.log()  # a stop asked for, not a failure to page anyone about
    assert not (tmp_path / 'zkprefork.pid').exists()
    assert not (tmp_path / 'zkprefork.pid.oldbin').exists()


def session_timeout_of(zookeeper, session_id):
    """The timeout (ms) ZooKeeper applies to the connection of `session_id`."""
    found = re.search(rf'sid=0x{session_id:x}\b[^)]*\bto=(\d+)', four_letter_word(zookeeper.port, 'cons'))
    return found and int(found.group(1))


def test_restart_only_options_take_effect_by_usr2(start, config, zookeeper, zk, zk_path, tmp_path, new_masters):
    server = start('session_timeout = 2000\n')
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    assert session_timeout_of(zookeeper, before.ephemeralOwner) == 2000
    access_log = tmp_path / 'access.log'
    config(f'session_timeout = 3000\naccess_log = {access_log}\nproperties =\n    dc = east\n')
    new = upgrade(server, new_masters)
    assert wait_until(lambda: node_data(zk, node).get('dc'), message='the new property') == 'east'
    after = zk.exists(node)
    assert (after.czxid, after.ephemeralOwner) == (before.czxid, before.ephemeralOwner)
    assert session_timeout_of(zookeeper, after.ephemeralOwner) == 3000
    answered_by(server.port, new)
    wait_until(lambda: access_log.exists() and 'GET / ' in access_log.read_text(), message='the access log')
    stop(new, zk, node)


def test_a_preloaded_application_s_new_code_by_usr2(start, app_module, zk, zk_path, new_masters):
    server = start('preload = true\n')
    node = wait_for_node(zk, zk_path)
    assert http_get(server.port)[1].startswith(b'v1 ')
    app_module('v2')
    new = upgrade(server, new_masters)
    assert http_get(server.port)[1].startswith(b'v2 ')
    stop(new, zk, node)


def test_a_changed_path_moves_the_node_make_before_break(start, config, zk, zk_path, new_masters):
    server = start()
    node = wait_for_node(zk, zk_path)
    old_session = zk.exists(node).ephemeralOwner
    new_path = zk_path.replace('/providers', '/moved')
    zk.ensure_path(new_path)
    children = {}
    seen = []  # after each change ZooKeeper reported: the nodes under both paths

    def watch(path):
        def changed(names):
            children[path] = names
            seen.append(sum(map(len, children.values())))
        zk.ChildrenWatch(path, changed)
    watch(zk_path)
    watch(new_path)
    config(path=new_path)
    new = upgrade(server, new_masters)
    moved = wait_for_node(zk, new_path)
    wait_until(lambda: not zk.get_children(zk_path), message='the old node to go')
    wait_until(lambda: seen[-1] == 1, message='the watcher to see the move')
    assert 0 not in seen[2:], f'a watcher saw no node at some point: {seen}'
    assert max(seen) == 2  # both, for a moment: the new one came first
    assert zk.exists(moved).ephemeralOwner != old_session  # a session of its own
    assert node_data(zk, moved)['pid'] == new
    answered_by(server.port, new)
    stop(new, zk, moved)
    assert zk.exists(node) is None


def ask(port, command):
    """One monitor command on 127.0.0.1:`port`; the answer, until the server closes."""
    with socket.create_connection(('127.0.0.1', port), timeout=10) as sock:
        sock.sendall(command)
        answer = b''
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode()


def test_monitor_upgrade_status_metrics_and_titles(start, zk, zk_path, new_masters):
    monitor = free_port()
    server = start(f'monitor_server = 127.0.0.1:{monitor}\n')
    node = wait_for_node(zk, zk_path)
    assert json.loads(ask(monitor, b'status\n'))['upgrade'] is None
    assert 'upgrade' in ask(monitor, b'help\n')
    ask(monitor, b'upgrade\n')
    new = new_master_started(server, 0, new_masters)
    server.process.send_signal(signal.SIGSTOP)  # holds the upgrade where it is: the old one answers nothing
    try:
        # The new master has the monitor's port (handed over) and waits for the session.
        def waiting():
            status = json.loads(ask(monitor, b'status\n'))
            return status['pid'] == new and status['upgrade']['state'] == 'taking over: awaiting session'\
                and status
        status = wait_until(waiting, timeout=15, message='the new master to await the session')
        assert status['upgrade']['old'] == server.pid
        assert 'zkprefork_upgrade_state{state="taking over: awaiting session"} 1.0' in ask(monitor, b'metrics\n')
        assert '[starting new master]' in ' '.join(psutil.Process(server.pid).cmdline())
        assert '[taking over: awaiting session]' in ' '.join(psutil.Process(new).cmdline())
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert server.wait(30) == 0
    status = json.loads(ask(monitor, b'status\n'))
    assert (status['pid'], status['upgrade']) == (new, None)
    assert 'zkprefork_upgrade_state{state="none"} 1.0' in ask(monitor, b'metrics\n')
    assert not any('[' in part for part in psutil.Process(new).cmdline())
    stop(new, zk, node)


class Notifications(Background):
    """A service manager's notify socket at `address`, read on a thread
    (a full queue would block the sender): `heard` is [(sender pid, line)]."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.heard = []
        super().__init__()

    def close(self):
        self.sock.close()

    def _run(self):
        while not self.stopping.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            pid = next(struct.unpack('3i', payload)[0] for level, kind, payload in ancillary
                       if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS))
            self.heard += [(pid, line) for line in data.decode().splitlines()]


def test_systemd_follows_the_new_master(servers, config, app_module, tmp_path, zk, zk_path, new_masters):
    """Under Type=notify with NotifyAccess=main, only the main pid is heard:
    the old master names its successor with MAINPID= before it retires, and
    says nothing after; the new master says nothing before, and is heard
    from then on."""
    address = str(tmp_path / 'notify.sock')
    with Notifications(address) as notify:
        server = servers(config(), env={'PYTHONPATH': str(tmp_path), 'NOTIFY_SOCKET': address}).wait_serving()
        node = wait_for_node(zk, zk_path)
        new = upgrade(server, new_masters)
        stop(new, zk, node)
    heard = notify.heard
    mainpid = heard.index((server.pid, f'MAINPID={new}'))
    assert [pid for pid, _ in heard[mainpid + 1:]] and \
        {pid for pid, _ in heard[mainpid + 1:]} == {new}
    assert (new, 'STOPPING=1') in heard[mainpid + 1:]
    assert new not in {pid for pid, _ in heard[:mainpid]}  # systemd would refuse (and log) it
    assert (server.pid, 'STOPPING=1') not in heard


def test_a_new_master_that_does_not_take_over_in_time_is_killed(start, zk, zk_path, tmp_path, new_masters):
    server = start('boot_timeout = 1\n')
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    server.signal(signal.SIGUSR2)
    new = new_master_started(server, 0, new_masters)
    os.kill(new, signal.SIGSTOP)  # hangs: it never says ready
    server.wait_for_log(r'upgrade failed: the new master \(pid \d+\) had not taken over within 2 x boot_timeout')
    wait_until(lambda: gone(new), message='the hung new master to be killed')
    assert_serves_as_before(server, zk, node, before, tmp_path)
    assert server.log().count('upgrade failed') == 1


def test_usr2_without_zookeeper(servers, ini, tmp_path, app_module, new_masters):
    server = servers(ini('host = 127.0.0.1\nworkers = 2\n', app='call:versioned_app:factory'),
                     env={'PYTHONPATH': str(tmp_path)}).wait_serving()
    app_module('v2')
    new = upgrade(server, new_masters)
    assert http_get(server.port)[1].startswith(b'v2 ')
    answered_by(server.port, new)
    pids = family(new)
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: all(gone(pid) for pid in pids), message='the new master and its workers to exit')


def test_upgrades_in_a_row_keep_the_node(start, zk, zk_path, tmp_path, new_masters):
    server = start(node_format='serverset')
    node = wait_for_node(zk, zk_path)
    before = zk.exists(node)
    first = upgrade(server, new_masters)
    second = upgrade(server, new_masters, old_pid=first)
    assert int((tmp_path / 'zkprefork.pid').read_text()) == second
    after = zk.exists(node)
    assert (after.czxid, after.ephemeralOwner) == (before.czxid, before.ephemeralOwner)
    answered_by(server.port, second)
    stop(second, zk, node)
