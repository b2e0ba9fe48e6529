"""Bad input: one line on stderr, exit status 2, nothing registered, nothing left running.

Every case runs the real command (``python -m zkprefork.cli``) in a session of
its own, with a ZooKeeper server it could register in, and then checks that
the session is empty and the service path was never created.
"""
import os
import signal
import socket
import subprocess
import sys
import textwrap

import psutil
import pytest

import zkprefork
from support import free_port, wait_until

COMMAND_TIMEOUT = 10  # seconds: a bad input must be refused at once, never served
pytestmark = pytest.mark.timeout(30)

OPTIONS = ('--workers', '--threads', '--host', '--port', '--zookeeper', '--path',
           '--server-name', '--app-name', '--pidfile')


class Result:
    def __init__(self, status, stdout, stderr, leftovers):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.leftovers = leftovers

    def __repr__(self):
        return (f'<exit status {self.status}, stdout {self.stdout!r}, stderr {self.stderr!r}, '
                f'left running: {self.leftovers}>')


def session_processes(sid):
    """Pids of the live (non-zombie) processes of session `sid`."""
    found = []
    for process in psutil.process_iter(['name', 'status']):
        try:
            if os.getsid(process.pid) == sid and process.info['status'] != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def run_zkprefork(args, directory, env=None, timeout=COMMAND_TIMEOUT, command=None):
    """Run the command in a new session; return its status, output and the
    processes of its session still alive once it has exited. Output goes to
    files, not pipes, so that a leftover child holding them cannot hang us."""
    command = command or [sys.executable, '-m', 'zkprefork.cli']
    out_path = os.path.join(directory, f'stdout-{os.getpid()}-{id(args)}')
    err_path = os.path.join(directory, f'stderr-{os.getpid()}-{id(args)}')
    leftovers = []
    with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
        process = subprocess.Popen(
            [*command, *[str(arg) for arg in args]], stdout=out, stderr=err,
            stdin=subprocess.DEVNULL, env=dict(os.environ, **(env or {})),
            start_new_session=True)
    try:
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        leftovers = session_processes(process.pid)
    finally:
        for pid in set(leftovers) | set(session_processes(process.pid)) | {process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        process.wait(10)
    with open(out_path, encoding='utf-8', errors='replace') as file:
        stdout = file.read()
    with open(err_path, encoding='utf-8', errors='replace') as file:
        stderr = file.read()
    if status is None:
        pytest.fail(f'zkprefork did not exit within {timeout} s: {stdout!r} {stderr!r}')
    return Result(status, stdout, stderr, leftovers)


def assert_one_line_error(result, *expected):
    """Exactly one line, on stderr, 'zkprefork: error: ...', naming each of `expected`."""
    assert result.stdout == '', result
    assert 'Traceback' not in result.stderr, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith('\n'), result
    line = lines[0]
    assert line.startswith('zkprefork: error: '), result
    for text in expected:
        assert text in line, f'{text!r} not named in {line!r}'
    assert result.status == 2, result
    assert result.leftovers == [], result


def assert_not_registered(zk, zk_path):
    assert zk.exists(zk_path) is None, f'{zk_path} was created: {zk.get_children(zk_path)}'


def registered_options(zookeeper, zk_path, host='127.0.0.1'):
    """Options that would make a server start, and register, if input were good."""
    return f'zookeeper = {zookeeper.hosts}\npath = {zk_path}\nhost = {host}\n'


# -- the configuration file ------------------------------------------------------

def test_missing_config_file(tmp_path, zk, zk_path, zookeeper):
    missing = tmp_path / 'nowhere' / 'app.ini'
    result = run_zkprefork([missing, '--zookeeper', zookeeper.hosts, '--path', zk_path], tmp_path)
    assert_one_line_error(result, str(missing), 'No such file or directory')
    assert_not_registered(zk, zk_path)


def test_config_file_that_is_a_directory(tmp_path, zk, zk_path, zookeeper):
    directory = tmp_path / 'app.ini'
    directory.mkdir()
    result = run_zkprefork([directory, '--zookeeper', zookeeper.hosts, '--path', zk_path], tmp_path)
    assert_one_line_error(result, str(directory))
    assert_not_registered(zk, zk_path)


@pytest.mark.skipif(os.geteuid() == 0, reason='root can read a file of mode 000')
def test_config_file_without_read_permission(tmp_path, ini, zookeeper, zk, zk_path):
    config = ini(registered_options(zookeeper, zk_path))
    os.chmod(config, 0)
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, config, 'Permission denied')
    assert_not_registered(zk, zk_path)


@pytest.mark.parametrize('content', [
    pytest.param(b'workers = 2\n[app:main]\nuse = egg:zkprefork#demo\n', id='no-section-header'),
    pytest.param(b'[app:main]\nuse = egg:zkprefork#demo\n[app:main]\nuse = egg:x\n', id='duplicate-section'),
    pytest.param(b'[app:main]\nuse = egg:zkprefork#demo\n[server:main]\nuse = egg:zkprefork\n'
                 b'port = 1\nport = 2\n', id='duplicate-option'),
    pytest.param(b'[app:main]\nuse = egg:zkprefork#demo\n# \xff\xfe not utf-8\n', id='not-utf-8'),
])
def test_config_file_that_is_not_an_ini_file(tmp_path, content, zookeeper, zk, zk_path):
    config = tmp_path / 'app.ini'
    config.write_bytes(content)
    result = run_zkprefork([config, '--zookeeper', zookeeper.hosts, '--path', zk_path,
                            '--host', '127.0.0.1'], tmp_path)
    assert_one_line_error(result, str(config))
    assert_not_registered(zk, zk_path)


def test_bad_interpolation_in_server_section(tmp_path, ini, zookeeper, zk, zk_path):
    config = ini(registered_options(zookeeper, zk_path) + 'port = %(undefined_variable)s\n')
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'undefined_variable')
    assert_not_registered(zk, zk_path)


def test_missing_app_section(tmp_path, zookeeper, zk, zk_path):
    config = tmp_path / 'app.ini'
    config.write_text('[server:main]\nuse = egg:zkprefork\n' + registered_options(zookeeper, zk_path))
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'app:main', str(config))
    assert_not_registered(zk, zk_path)


def test_app_name_that_names_a_missing_section(tmp_path, ini, zookeeper, zk, zk_path):
    config = ini(registered_options(zookeeper, zk_path))
    result = run_zkprefork([config, '--app-name', 'elsewhere'], tmp_path)
    assert_one_line_error(result, 'app:elsewhere')
    assert_not_registered(zk, zk_path)


def test_server_name_that_names_a_missing_section(tmp_path, ini, zookeeper, zk, zk_path):
    config = ini(registered_options(zookeeper, zk_path))
    result = run_zkprefork([config, '--server-name', 'elsewhere'], tmp_path)
    assert_one_line_error(result, 'server:elsewhere')
    assert_not_registered(zk, zk_path)


def test_unknown_option_in_server_section(tmp_path, ini, zookeeper, zk, zk_path):
    config = ini(registered_options(zookeeper, zk_path) + 'colour = blue\n')
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'colour')
    assert_not_registered(zk, zk_path)


# -- option values -----------------------------------------------------------------

BAD_VALUES = [
    # (option, value, texts the error line must contain)
    ('workers', '0', ['workers', "'0'"]),
    ('workers', 'two', ['workers', "'two'"]),
    ('threads', '-1', ['threads', "'-1'"]),
    ('port', '70000', ['port', "'70000'"]),
    ('session_timeout', 'abc', ['session_timeout', "'abc'"]),
    ('graceful_timeout', '-5', ['graceful_timeout', "'-5'"]),
    ('path', 'relative/providers', ['path', "'relative/providers'"]),
    ('zookeeper', '127.0.0.1:2181,', ['zookeeper', "'127.0.0.1:2181,'"]),
    ('zookeeper', '127.0.0.1:2181/chroot/', ['zookeeper', "'127.0.0.1:2181/chroot/'"]),
    ('zookeeper', 'zk one:2181', ['zookeeper', "'zk one:2181'"]),
    ('zookeeper', '127.0.0.1:abc', ['zookeeper', "'127.0.0.1:abc'"]),
    ('monitor_server', '127.0.0.1', ['monitor_server', "'127.0.0.1'"]),
    ('monitor_server', '127.0.0.1:', ['monitor_server', "'127.0.0.1:'"]),
    ('loggers', 'verbose', ['loggers', "'verbose'"]),
    ('loggers', '\n  <logger>\n    level verbose\n  </logger>', ['loggers', 'verbose']),
    ('zservertracelog', 'maybe', ['zservertracelog', "'maybe'"]),
    # name goes into the Server header: a line break would inject a header,
    # and zope.server fails every request on a character beyond latin-1.
    ('name', 'myname\nX-Injected: yes', ['name', 'printable ASCII']),
    ('name', 'caf\u20ac', ['name', "'caf\u20ac'", 'printable ASCII']),
    ('name', 'a\x01b', ['name', 'printable ASCII']),
    ('boot_timeout', '-5', ['boot_timeout', "'-5'", 'must be more than zero seconds']),
    ('keepalive', 'nan', ['keepalive', "'nan'", 'must be more than zero seconds']),
]


def _ini_value(value):
    """An ini option value; continuation lines indented."""
    return value.replace('\n', '\n ') if '\n' in value.strip() else value


@pytest.mark.parametrize('option, value, expected', BAD_VALUES,
                         ids=[f'{o}={v.strip()[:20]}' for o, v, _ in BAD_VALUES])
def test_bad_value_in_ini(tmp_path, ini, zookeeper, zk, zk_path, option, value, expected):
    defaults = {'zookeeper': zookeeper.hosts, 'path': zk_path, 'host': '127.0.0.1'}
    defaults[option] = _ini_value(value)
    config = ini(''.join(f'{name} = {text}\n' for name, text in defaults.items()))
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, *expected)
    assert_not_registered(zk, zk_path)


@pytest.mark.parametrize('flag, value, expected', [
    ('--workers', '0', ['workers', "'0'"]),
    ('--threads', '-1', ['threads', "'-1'"]),
    ('--port', '70000', ['port', "'70000'"]),
    ('--path', 'relative', ['path', "'relative'"]),
    ('--zookeeper', 'zk:2181//x', ['zookeeper', "'zk:2181//x'"]),
], ids=['workers=0', 'threads=-1', 'port=70000', 'path=relative', 'zookeeper=zk:2181//x'])
def test_bad_value_on_command_line_overrides_a_good_ini(tmp_path, ini, zookeeper, zk, zk_path,
                                                        flag, value, expected):
    config = ini(registered_options(zookeeper, zk_path) + 'workers = 1\n')
    result = run_zkprefork([config, flag, value], tmp_path)
    assert_one_line_error(result, *expected)
    assert_not_registered(zk, zk_path)


@pytest.mark.parametrize('path, expected', [
    ('{zk_path}/p\x01', 'ZooKeeper refuses the character U+0001'),
    ('/zookeeper/{name}', 'reserved /zookeeper subtree'),
], ids=['control-character', 'reserved'])
def test_paths_zookeeper_refuses_are_refused_at_start(tmp_path, ini, zookeeper, zk, zk_path,
                                                      path, expected):
    path = path.format(zk_path=zk_path, name=os.path.basename(tmp_path))
    config = ini(f'zookeeper = {zookeeper.hosts}\nhost = 127.0.0.1\n')
    result = run_zkprefork([config, '--path', path], tmp_path)
    assert_one_line_error(result, 'path', expected)
    assert_not_registered(zk, zk_path)
    assert not zk.exists('/zookeeper/' + os.path.basename(tmp_path))


def test_zookeeper_without_path(tmp_path, ini, zookeeper, zk, zk_path):
    config = ini(f'zookeeper = {zookeeper.hosts}\nhost = 127.0.0.1\n')
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'path')


# -- errors found while starting -----------------------------------------------------

def test_host_that_cannot_be_resolved(tmp_path, ini, zookeeper, zk, zk_path):
    config = ini(registered_options(zookeeper, zk_path, host='no-such-host.invalid'))
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'host', 'no-such-host.invalid')
    assert_not_registered(zk, zk_path)


def test_host_that_is_not_an_address_of_this_machine(tmp_path, ini, zookeeper, zk, zk_path):
    # 192.0.2.1 is TEST-NET-1: never assigned to a local interface.
    config = ini(registered_options(zookeeper, zk_path, host='192.0.2.1'))
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'host', '192.0.2.1')
    assert_not_registered(zk, zk_path)


def test_port_already_in_use(tmp_path, ini, zookeeper, zk, zk_path):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = ini(registered_options(zookeeper, zk_path) + f'port = {port}\nworkers = 2\n')
        result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'port', str(port))
    assert_not_registered(zk, zk_path)


def test_port_already_in_use_on_the_command_line(tmp_path, ini, zookeeper, zk, zk_path):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_zkprefork([ini(registered_options(zookeeper, zk_path)), '--port', port], tmp_path)
    assert_one_line_error(result, 'port', str(port))
    assert_not_registered(zk, zk_path)


def test_pidfile_in_a_missing_directory(tmp_path, ini, zookeeper, zk, zk_path):
    pidfile = tmp_path / 'no-such-dir' / 'zkprefork.pid'
    result = run_zkprefork([ini(registered_options(zookeeper, zk_path)), '--pidfile', pidfile], tmp_path)
    assert_one_line_error(result, 'pidfile', str(pidfile))
    assert_not_registered(zk, zk_path)


def test_pidfile_that_is_a_directory(tmp_path, ini, zookeeper, zk, zk_path):
    pidfile = tmp_path / 'run'
    pidfile.mkdir()
    result = run_zkprefork([ini(registered_options(zookeeper, zk_path)), '--pidfile', pidfile], tmp_path)
    assert_one_line_error(result, 'pidfile', str(pidfile))
    assert_not_registered(zk, zk_path)
    assert os.listdir(tmp_path / 'run') == []
    assert [name for name in os.listdir(tmp_path) if name.startswith('.zkprefork-pid-')] == []


def test_loggers_with_a_log_file_that_cannot_be_opened(tmp_path, ini, zookeeper, zk, zk_path):
    log_path = tmp_path / 'logs'
    log_path.mkdir()  # a directory, not a file: open() fails even for root
    loggers = textwrap.indent(textwrap.dedent(f'''\
        <logger>
          level INFO
          <logfile>
            path {log_path}
            format $$(levelname)s $$(message)s
          </logfile>
        </logger>'''), '  ')
    config = ini(registered_options(zookeeper, zk_path) + f'loggers =\n{loggers}\n')
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'loggers', str(log_path))
    assert_not_registered(zk, zk_path)


@pytest.mark.parametrize('target, reason', [
    ('{tmp_path}', 'Is a directory'),
    ('/proc/version', 'Invalid argument'),  # writable, but takes no appending
], ids=['directory', 'proc-file'])
def test_access_log_that_cannot_be_opened(tmp_path, ini, zookeeper, zk, zk_path, target, reason):
    target = target.format(tmp_path=tmp_path)
    config = ini(registered_options(zookeeper, zk_path) + f'access_log = {target}\n')
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'access_log', repr(target), reason)
    assert_not_registered(zk, zk_path)


def test_zookeeper_ca_file_that_is_not_pem(tmp_path, ini, zookeeper, zk, zk_path):
    ca_file = tmp_path / 'hostname'
    ca_file.write_text('myhost\n')  # readable, as /etc/hostname is
    config = ini(registered_options(zookeeper, zk_path) + f'zookeeper_ca_file = {ca_file}\n')
    result = run_zkprefork([config], tmp_path)
    assert_one_line_error(result, 'zookeeper_ca_file', str(ca_file), 'no CA certificate loads')
    assert_not_registered(zk, zk_path)


# -- the command line ------------------------------------------------------------------

@pytest.mark.parametrize('args, expected', [
    (['--bogus'], ['--bogus']),
    (['--workers'], ['--workers']),
    (['--wrokers', '2'], ['--wrokers']),
    ([], ['config']),
    (['second.ini'], ['second.ini']),
], ids=['unknown-flag', 'flag-without-value', 'misspelt-flag', 'no-config', 'two-configs'])
def test_bad_command_line(tmp_path, ini, zookeeper, zk, zk_path, args, expected):
    config = ini(registered_options(zookeeper, zk_path))
    result = run_zkprefork(([config] if args else []) + args, tmp_path)
    assert_one_line_error(result, *expected)
    assert_not_registered(zk, zk_path)


def test_version(tmp_path):
    result = run_zkprefork(['--version'], tmp_path)
    assert result.status == 0, result
    assert result.stdout == f'zkprefork {zkprefork.__version__}\n', result
    assert result.stderr == '', result
    assert result.leftovers == []


def test_version_matches_the_installed_distribution():
    from importlib.metadata import version
    assert version('zkprefork') == zkprefork.__version__


def test_help_mentions_every_option(tmp_path):
    result = run_zkprefork(['--help'], tmp_path)
    assert result.status == 0, result
    assert result.stderr == '', result
    for option in OPTIONS:
        assert option in result.stdout, f'{option} missing from --help'
    assert 'config' in result.stdout
    assert result.leftovers == []


def test_console_script_is_installed():
    from importlib.metadata import entry_points
    scripts = {ep.name: ep.value for ep in entry_points(group='console_scripts')}
    assert scripts.get('zkprefork') == 'zkprefork.cli:main'


# -- an application that fails to load -------------------------------------------------

BROKEN_APPS = {
    'factory-raises': (
        'call:tests_broken_app:factory',
        'def factory(global_conf, **local_conf):\n'
        '    raise RuntimeError("the database is on fire")\n',
        'the database is on fire'),
    'import-fails': (
        'call:tests_broken_app:factory',
        'import tests_no_such_module_at_all\n\ndef factory(global_conf, **local_conf):\n    pass\n',
        'tests_no_such_module_at_all'),
    'syntax-error': (
        'call:tests_broken_app:factory',
        'def factory(global_conf, **local_conf)\n    pass\n',
        'SyntaxError'),
    'missing-module': (
        'call:tests_not_there:factory', None, 'tests_not_there'),
}


@pytest.mark.parametrize('case', list(BROKEN_APPS))
@pytest.mark.parametrize('mode', ['workers = 1', 'workers = 3', 'preload = true'])
def test_app_that_fails_to_load_at_first_start(tmp_path, ini, zookeeper, zk, zk_path, case, mode):
    use, source, message = BROKEN_APPS[case]
    if source is not None:
        (tmp_path / 'tests_broken_app.py').write_text(source)
    config = ini(registered_options(zookeeper, zk_path) + mode + '\n', app=use)
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')]))
    result = run_zkprefork([config], tmp_path, env={'PYTHONPATH': pythonpath})
    output = result.stdout + result.stderr
    assert result.status == 1, result
    assert message in output, result
    assert result.leftovers == [], result
    assert_not_registered(zk, zk_path)


def test_good_config_is_accepted_control(tmp_path, ini, zookeeper, zk, zk_path):
    """The control for the cases above: the same options, well formed, start and
    register (so that 'not registered' above means something)."""
    port = free_port()
    config = ini(registered_options(zookeeper, zk_path) + f'port = {port}\n')
    process = subprocess.Popen([sys.executable, '-m', 'zkprefork.cli', config],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_until(lambda: zk.exists(zk_path) and zk.get_children(zk_path), timeout=15,
                   message='the registration')
        assert zk.get_children(zk_path) == [f'127.0.0.1:{port}']
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert session_processes(process.pid) == []
    finally:
        for pid in set(session_processes(process.pid)) | {process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        process.wait(10)
