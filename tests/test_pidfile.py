"""The pidfile counts as live only while a master holds its lock: a pid that
now belongs to some other process is a stale pidfile, replaced at start."""
import signal
import subprocess

from support import wait_until


def start_with_pidfile(servers, ini, pidfile):
    server = servers(ini(f'host = 127.0.0.1\npidfile = {pidfile}\n')).wait_serving()
    assert pidfile.read_text() == f'{server.pid}\n'
    return server


def test_a_pid_reused_by_a_process_named_like_zkprefork_is_stale(servers, ini, tmp_path):
    log = tmp_path / 'zkprefork.log'
    log.write_text('')
    tail = subprocess.Popen(['tail', '-F', str(log)], stdout=subprocess.DEVNULL)
    try:
        pidfile = tmp_path / 'zkprefork.pid'
        pidfile.write_text(f'{tail.pid}\n')
        server = start_with_pidfile(servers, ini, pidfile)
        assert 'replaced' not in server.log()
    finally:
        tail.kill()
        tail.wait()


def test_a_pid_that_is_another_servers_worker_is_stale(servers, ini, tmp_path):
    other = servers(ini('host = 127.0.0.1\nworkers = 1\n')).wait_serving()
    worker = wait_until(other.worker_pids, message='the other server\'s worker')
    pidfile = tmp_path / 'run.pid'
    pidfile.write_text(f'{next(iter(worker))}\n')
    server = start_with_pidfile(servers, ini, pidfile)
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert not pidfile.exists()


def test_a_master_killed_outright_leaves_a_stale_pidfile(servers, ini, tmp_path):
    pidfile = tmp_path / 'run.pid'
    first = start_with_pidfile(servers, ini, pidfile)
    first.kill()  # SIGKILL to the master and its children: the lock dies with them
    assert pidfile.exists()
    start_with_pidfile(servers, ini, pidfile)
