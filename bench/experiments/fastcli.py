"""`python -m zkprefork.cli`, with the bench-only prototypes installed.

    python3 bench/experiments/fastcli.py --variant NAME[+NAME...] INI [zkprefork options]

Worker variants (see fastserver.py) are installed in every worker right after
fork: zope.server is still imported only there.  Two variants act in the
master instead:

pre     import zope.server (and zkprefork.zopeserver) in the master, and
        gc.freeze() right before every fork, so that workers share those
        pages copy-on-write instead of each importing its own copy
        (zkprefork.zopeserver.fresh_wakeup() already gives each worker its
        own wake-up pipe and socket map, as it does for preload).
arena2  MALLOC_ARENA_MAX=2 in the environment (glibc otherwise gives each
        thread that allocates its own malloc arena).

And one that replaces the module:

proposal  zkprefork.zopeserver is replaced by proposed_zopeserver.py (this
        folder), the exact code recommended for zkprefork/zopeserver.py, and
        the worker uses its TaskDispatcher (the one-line worker.py change).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
MASTER_VARIANTS = {'pre', 'arena2', 'proposal'}


def main():
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != '--variant':
        raise SystemExit('usage: fastcli.py --variant NAME[+NAME...] INI [zkprefork options]')
    names = argv[1].split('+')
    if 'arena2' in names and os.environ.get('MALLOC_ARENA_MAX') != '2':
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_ARENA_MAX='2'))
    worker_names = [n for n in names if n not in MASTER_VARIANTS]
    from zkprefork import cli, master, worker

    if worker_names:
        original = worker.Worker._start_server

        def _start_server(self, app):
            import fastserver
            fastserver.install(worker_names)
            return original(self, app)
        worker.Worker._start_server = _start_server
    if 'proposal' in names:
        original_start = worker.Worker._start_server

        def _start_server_proposal(self, app):
            import importlib.util

            import zope.server.taskthreads
            spec = importlib.util.spec_from_file_location(
                'zkprefork.zopeserver', os.path.join(HERE, 'proposed_zopeserver.py'))
            module = importlib.util.module_from_spec(spec)
            sys.modules['zkprefork.zopeserver'] = module
            spec.loader.exec_module(module)
            import zkprefork
            zkprefork.zopeserver = module
            zope.server.taskthreads.ThreadedTaskDispatcher = module.TaskDispatcher
            return original_start(self, app)
        worker.Worker._start_server = _start_server_proposal
    if 'pre' in names:
        import gc

        import zope.server.http.wsgihttpserver  # noqa: F401
        import zope.server.taskthreads  # noqa: F401

        import zkprefork.zopeserver  # noqa: F401
        import zkprefork.wakeup  # noqa: F401
        if worker_names:
            import fastserver  # noqa: F401
        spawn = master.Master._spawn

        def _spawn(self, slot):
            # Never unfrozen: a later collection in the master would otherwise
            # write to every object's GC header and un-share the pages.
            gc.freeze()
            return spawn(self, slot)
        master.Master._spawn = _spawn
    return cli.main(argv[2:])


if __name__ == '__main__':
    sys.exit(main())
