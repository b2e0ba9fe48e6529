"""The README tells the truth: its commands are CI's and the demo's, it
documents every option, it is valid reStructuredText, and the demo it
describes runs, end to end, and leaves no process behind."""
import os
import re
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from zkprefork.settings import OPTIONS
from support import wait_until

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_COMMAND = ('apt-get update -q && apt-get install -y -q zookeeper && pip install -e . '
                '&& python3 etc/demo.py')
ZOOKEEPER_JAR = '/usr/share/java/zookeeper.jar'
ZKCLI = '/usr/share/zookeeper/bin/zkCli.sh'
DEMO_TIMEOUT = 90


def read(name):
    with open(os.path.join(CHECKOUT, name), encoding='utf-8') as file:
        return file.read()


def readme_lines():
    return [line.strip() for line in read('README.rst').splitlines()]


def ci_test_command():
    """The last line of .ci/run: the command after `cd`."""
    lines = [line.strip() for line in read('.ci/run').splitlines()]
    return [line for line in lines if line and not line.startswith('#')][-1]


def test_readme_gives_cis_test_command_verbatim_on_one_line():
    command = ci_test_command()
    assert command == ("apt-get update -q && apt-get install -y -q zookeeper && "
                       "pip install -q -e '.[test]' && python3 -m pytest")
    assert command in readme_lines()


def test_readme_gives_the_demo_command_verbatim_on_one_line():
    assert DEMO_COMMAND in readme_lines()
    # The quick start comes before the tests' command.
    lines = readme_lines()
    assert lines.index(DEMO_COMMAND) < lines.index(ci_test_command())


@pytest.mark.parametrize('option', OPTIONS)
def test_readme_documents_every_option(option):
    assert f'``{option}``' in read('README.rst')


def _check_rst(text, source):
    docutils_core = pytest.importorskip('docutils.core')
    import docutils.utils
    try:
        docutils_core.publish_string(
            text, source_path=source, writer_name='null',
            settings_overrides={'halt_level': 2, 'report_level': 2, 'warning_stream': False})
    except docutils.utils.SystemMessage as error:
        pytest.fail(f'{source} is not valid reStructuredText: {error}')


@pytest.mark.parametrize('name', ['README.rst', 'CHANGES.rst'])
def test_valid_restructuredtext(name):
    _check_rst(read(name), name)


def test_long_description_is_valid_restructuredtext():
    # setup.py joins them so.
    _check_rst(read('README.rst') + '\n\n' + read('CHANGES.rst'), 'long_description')


def _started_by_the_demo(marker, directory, since):
    """Live processes that the demo started (directly or not)."""
    found = []
    for process in psutil.process_iter(['pid', 'cmdline', 'create_time']):
        info = process.info
        command = ' '.join(info['cmdline'] or ())
        if info['create_time'] is None or info['create_time'] < since:
            continue
        if directory not in command and 'zkprefork: ' not in command:
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            # Only ours, not a concurrent test run's: children inherit the marker.
            if process.environ().get('ZKPREFORK_DEMO_TEST') != marker and directory not in command:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found.append(process)
    return found


def _kill(processes):
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.skipif(not os.path.exists(ZOOKEEPER_JAR), reason=f'{ZOOKEEPER_JAR} is missing')
@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path):
    marker = uuid.uuid4().hex
    directory = str(tmp_path)
    # The demo's temporary files (ZooKeeper's config and data) go under tmp_path.
    env = dict(os.environ, TMPDIR=directory, ZKPREFORK_DEMO_TEST=marker)
    since = time.time() - 1
    try:
        result = subprocess.run(
            [sys.executable, os.path.join('etc', 'demo.py')], cwd=CHECKOUT, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        _kill(_started_by_the_demo(marker, directory, since))
        pytest.fail(f'the demo did not finish within {DEMO_TIMEOUT} s:\n{error.output}')

    # Everything it started is gone (give the kernel a moment to reap).
    try:
        wait_until(lambda: not _started_by_the_demo(marker, directory, since), timeout=3,
                   message='the processes the demo started to be gone')
    except AssertionError:
        pass  # named below
    left = _started_by_the_demo(marker, directory, since)
    described = []
    for process in left:
        try:
            described.append(f'{process.pid}: {" ".join(process.cmdline())}')
        except psutil.NoSuchProcess:
            pass
    _kill(left)
    assert not described, 'the demo left processes behind:\n' + '\n'.join(described)

    output = result.stdout
    assert result.returncode == 0, output
    node = re.search(r'^ +node /demo/providers/(127\.0\.0\.1:(\d+))$', output, re.MULTILINE)
    assert node, output
    data = re.search(r'^ +data (\{.*\})$', output, re.MULTILINE)
    assert data and re.match(r'\{"pid":\d+,', data.group(1)), output
    if os.path.exists(ZKCLI):
        assert f'    [{node.group(1)}]' in output.splitlines(), output
    workers = set(re.findall(r'^ +worker pid (\d+): \d+ request', output, re.MULTILINE))
    assert len(workers) > 1, output
    assert re.search(r'the node is gone .*/demo/providers has children \[\]', output), output
    assert 'zkprefork exited with status 0' in output, output
    assert 'ZooKeeper (pid' in output and 'stopped' in output, output
