"""What a registration looks like in ZooKeeper: node names and data for each
supported format, from the endpoints (host, port) and zkprefork's data."""
from zkprefork.listener import format_address


def zk_nodes(endpoints, data):
    """zc.zk / zc.zkzopeserver: one node per endpoint, named host:port, whose
    data is zkprefork's own (pid, instance, workers, ...)."""
    return [(format_address(host, port), data) for host, port in endpoints]
