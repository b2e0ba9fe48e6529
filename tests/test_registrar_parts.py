"""Unit tests of the registrar's pure parts: who owns a node (zknodes.verdict)
and the loop's timers. The session and the reconciliation themselves are
tested against a real ZooKeeper (test_registration.py, test_zk_security.py)."""
import os
import time

from kazoo.protocol.states import ZnodeStat

from support import dead_pid
from zkprefork import nodeformat
from zkprefork.registrar import nodes as zknodes
from zkprefork.registrar.loop import Timers


def stat(owner, ctime_s=None):
    ctime = int((time.time() if ctime_s is None else ctime_s) * 1000)
    return ZnodeStat(1, 1, ctime, ctime, 0, 0, 0, owner, 10, 0, 1)


def claim(pid=None, same_instance=False):
    return nodeformat.Claim(('127.0.0.1', 80), pid, same_instance)


def test_verdicts():
    assert zknodes.verdict(7, claim(), stat(7)) == zknodes.OURS
    assert zknodes.verdict(7, claim(same_instance=True), stat(0)) == zknodes.PERSISTENT
    assert zknodes.verdict(7, claim(same_instance=True), stat(8)) == zknodes.STALE
    assert zknodes.verdict(7, claim(pid=dead_pid()), stat(8)) == zknodes.STALE
    assert zknodes.verdict(7, claim(pid=os.getpid()), stat(8)) == zknodes.FOREIGN
    # A live pid that started after the node was made did not make it.
    assert zknodes.verdict(7, claim(pid=os.getpid()), stat(8, ctime_s=1000)) == zknodes.STALE
    assert zknodes.verdict(7, claim(), stat(8)) == zknodes.FOREIGN  # no pid: cannot tell


def test_held_back_lines():
    assert 'persistent node' in zknodes.held_back('/s/n', zknodes.PERSISTENT, b'', stat(0))
    line = zknodes.held_back('/s/n', zknodes.FOREIGN, b'{"pid":1}', stat(0x1f))
    assert 'session 0x1f, {"pid":1}' in line and '\n' not in line


def test_timers():
    timers, ran = Timers(), []

    def job():
        ran.append('now')
    assert timers.wait() is None
    timers.at(60, lambda: ran.append('late'))
    timers.at(0.5, job)
    timers.at(0, job)  # one pending run per job: the last time given wins
    assert timers.pending(job) and timers.wait() == 0.0
    timers.run_due()
    assert ran == ['now'] and not timers.pending(job)
    assert 59 < timers.wait() <= 60
    timers.at(0, job)
    timers.cancel(job)
    timers.run_due()
    assert ran == ['now']
