"""zkprefork.addresses: how every process writes and reads host:port."""
from zkprefork import addresses


def test_parse_address():
    assert addresses.parse_address('[::1]:80') == ('::1', 80)
    assert addresses.parse_address('host:80') == ('host', 80)
    assert addresses.parse_address(':80') == ('', 80)
    assert addresses.parse_address('host') is None


def test_format_address_brackets_ipv6_only():
    assert addresses.format_address('::1', 80) == '[::1]:80'
    assert addresses.format_address('10.0.0.1', 80) == '10.0.0.1:80'
    assert addresses.parse_address(addresses.format_address('fe80::1', 8080)) == ('fe80::1', 8080)


def test_a_wildcard_is_reached_on_loopback():
    assert [addresses.is_wildcard(h) for h in ('', '0.0.0.0', '::', '127.0.0.1')] == [True, True, True, False]
    assert [addresses.reachable_host(h) for h in ('', '0.0.0.0', '::', 'example')] == [
        '127.0.0.1', '127.0.0.1', '::1', 'example']
    assert addresses.bindable_host('') == '0.0.0.0'
