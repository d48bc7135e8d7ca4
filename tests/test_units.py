"""URLs and human units: pure."""
from __future__ import annotations

import pytest

from bot.etcd.urls import parse_url
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
