"""A worker process: serves the shared listening socket with zope.server, a
thread pool and llhttp. It never touches ZooKeeper."""
