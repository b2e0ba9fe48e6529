"""zkprefork: a prefork WSGI server on zope.server that registers in ZooKeeper."""

__version__ = '0.1.0'
