"""The master process: binds the listener, forks and supervises the workers,
runs the registrar, the monitor and the signal loop. It never imports kazoo
and never runs the application (except to preload it before forking)."""
