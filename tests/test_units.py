"""URLs and human units: pure."""
from __future__ import annotations

import pytest

from bot.domain.cluster import Member
from bot.domain.errors import EtcdUnusableURL
from bot.domain.urls import Unusable, dial, parse_url, read_url, shown_urls, usable_urls
from bot.etcd.client import EtcdClient
from bot.etcd.health import _ask_member
from bot.output.units import humanize_bytes


@pytest.mark.parametrize("n, text", [(0, "0 B"), (9, "9 B"), (10, "10 B"), (1000, "1.0 kB"), (20480, "20 kB"),
                                     (2_100_000, "2.1 MB"), (9_950_000, "10 MB"), (314_572_800, "315 MB")])
def test_humanize_bytes_as_go_humanize(n, text):
    assert humanize_bytes(n) == text


@pytest.mark.parametrize("url", ["http://10.0.0.4:2380", "https://etcd-0.etcd.kube-system.svc:2379", "http://[::1]:2379"])
def test_good_urls(url):
    assert parse_url(url).url == url


@pytest.mark.parametrize("url, why", [
    ("10.0.0.4:2380", "scheme"), ("ftp://h:1", "scheme"), ("http://h", "no port"), ("http://:80", "no host"),
    ("http://h:99999", "port"), ("http://h:80/path", "no path"), ("http://u:p@h:80", "credentials"),
    ("http://bad_host:80", "bad host name"), ("", "empty"),
])
def test_bad_urls_say_why(url, why):
    with pytest.raises(ValueError, match=why):
        parse_url(url)


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:238000", "port out of range"), ("http://h:99999", "port out of range"),
    ("http://h:abc", "bad port"), ("http://[::1", "does not parse"), ("unix:///run/etcd.sock", "scheme"),
    ("http://h", "no port"), ("", "empty"),
])
def test_a_url_etcd_hands_back_is_read_whatever_it_is(url, why):
    """etcd stores what `member add --peer-urls` was given; reading it never raises, it says why it is unusable."""
    found = read_url(url)
    assert isinstance(found, Unusable) and why in found.reason
    assert str(found) == f"unusable URL {url!r} ({found.reason})"
    assert shown_urls(["http://10.0.0.1:2380", url]) == f"http://10.0.0.1:2380, unusable URL {url!r} ({found.reason})"
    assert usable_urls(["http://10.0.0.1:2380/", url]) == ["http://10.0.0.1:2380"]
    with pytest.raises(EtcdUnusableURL, match="unusable URL"):
        dial(url)


def test_two_urls_with_the_same_host_and_port_have_one_address():
    assert {parse_url(u).address for u in ("http://H1:2379/", "https://h1:2379")} == {"h1:2379"}
    assert parse_url("http://[0:0::1]:2379").address == parse_url("https://[::1]:2379").address == "[::1]:2379"
    assert parse_url("http://h1:2379").address != parse_url("http://h1:2380").address


async def test_a_member_whose_client_urls_are_unusable_is_one_member_down_not_a_failed_check():
    """The health fan-out asks each member on its own: an unusable client URL is that member's problem
    (nothing is dialled), and the check goes on."""
    client = EtcdClient(["http://127.0.0.1:1"])
    try:
        with pytest.raises(EtcdUnusableURL):
            await client.status("http://127.0.0.1:238000", timeout=0.5)
        health, _ = await _ask_member(client, Member(7, "member7", ("http://127.0.0.1:238000",),
                                                     ("http://127.0.0.1:238001",)), 0.5)
    finally:
        await client.close()
    assert not health.reachable and health.error == "unusable URL 'http://127.0.0.1:238001' (port out of range)"
