"""Forking a worker: the socketpair between master and worker, and in the
child, dropping everything that is the master's alone before it serves."""
import gc
import os
import socket

from zkprefork.master import systemd
from zkprefork.worker import protocol as worker_protocol
from zkprefork.worker.process import reset_signals


def import_serving_stack():
    """Import zope.server (with zkprefork.worker.zopeserver) before the first fork,
    so that its pages are shared by every worker and a new worker serves at
    once. The master calls this after starting the registrar, which then
    boots while the master imports. The master never runs that stack: no
    zope.server socket, thread or loop exists in it, and each worker replaces
    the wake-up pipe and socket map zope.server makes at import
    (zopeserver.fresh_wakeup) before it serves."""
    import zkprefork.worker.zopeserver  # noqa: F401


def fork_worker(serve, selector, masters_fds, handled_signals):
    """Fork. In the child: reset `handled_signals`, close `selector` and
    `masters_fds` (so that end of file on those pipes keeps meaning 'the
    master died'), then `serve(link socket)`, which never returns. In the
    master: return (pid, worker_protocol.Link)."""
    master_end, worker_end = socket.socketpair()
    # Neither garbage collector writes to what the worker inherits, so
    # those pages (a preloaded application above all) stay shared; the
    # master never unfreezes. Collect first: cyclic garbage frozen here
    # would never be freed (every reload's parsed ini file, ~80 objects,
    # was), and collect() skips what is frozen already, so only what was
    # made since the last fork is scanned.
    gc.collect()
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        master_end.close()
        reset_signals(handled_signals)
        systemd.forget_notify_socket()
        selector.close()
        for fd in masters_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        serve(worker_end)
    worker_end.close()
    return pid, worker_protocol.Link(master_end)
