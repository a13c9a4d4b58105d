"""forward/targets.py, pure: which addresses a tunnel may reach by a name."""

from __future__ import annotations

import pytest

from tokenproxy.forward.targets import local_address, names_local


@pytest.mark.parametrize(("address", "local"), [
    ("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("0.0.0.0", True), ("::", True),
    ("169.254.169.254", True), ("fe80::1%eth0", True),     # link-local: metadata services
    # IPv4-mapped IPv6: an AF_INET6 socket connects to the IPv4 address inside.
    ("::ffff:127.0.0.1", True), ("::ffff:0.0.0.0", True), ("::ffff:169.254.169.254", True),
    ("::ffff:93.184.215.14", False),
    ("10.0.0.1", False), ("192.168.1.1", False), ("93.184.215.14", False),
    ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", False), ("localhost", False), ("x", False),
])
def test_local_addresses(address: str, local: bool) -> None:
    assert local == local_address(address)


@pytest.mark.parametrize(("host", "local"), [
    ("localhost", True), ("localhost.", True), ("127.0.0.1", True), ("::1", True),
    ("pypi.org", False), ("files.pythonhosted.org", False), ("10.0.0.1", False),
])
def test_a_host_names_a_local_address_only_literally(host: str, local: bool) -> None:
    assert local == names_local(host)
