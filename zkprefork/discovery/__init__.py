"""A Python 3 reader of what zkprefork (and the other writers of its node
formats) registers in ZooKeeper: ``Providers``, and the
``zkprefork-providers`` command (zkprefork.discovery.command)."""
from zkprefork.discovery.provider import QUARANTINE, NoProviders, Provider
from zkprefork.discovery.providers import DiscoveryError, Providers

__all__ = ['QUARANTINE', 'DiscoveryError', 'NoProviders', 'Provider', 'Providers']
