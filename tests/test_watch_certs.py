"""The certificate condition: members' serving certificates read in the TLS handshake (client and peer URLs),
and the warning threshold."""
from __future__ import annotations

import time
from pathlib import Path

from bot.etcd.certs import DAY, CertReading, Kind, ServingCert, expiring, parse_der, read_certs, remaining, tls_urls
from bot.etcd.model import Member, TLSFiles
from bot.testing import certs

NOW = 1_000_000.0


def reading(member: str, days: float | None, kind: Kind = "peer") -> CertReading:
    url = f"https://10.0.0.1:{2380 if kind == 'peer' else 2379}"
    if days is None:
        return CertReading(member, kind, url, error="no TLS handshake within 2s", at=NOW)
    return CertReading(member, kind, url, cert=ServingCert(NOW + days * DAY, "CN=etcd-member"), at=NOW)


# ---------------------------------------------------------------- pure

def test_only_certificates_within_the_warning_are_expiring_soonest_first() -> None:
    readings = [reading("m1", 90), reading("m2", 3, "client"), reading("m3", 13.9), reading("m4", -1),
                reading("m5", None), reading("m6", 14.1)]
    found = expiring(readings, NOW, 14 * DAY)
    assert [(r.member, r.kind) for r in found] == [("m4", "peer"), ("m2", "client"), ("m3", "peer")]
    assert expiring(readings, NOW, 0) == [readings[3]]  # only the expired one


def test_the_margin_reads_as_people_say_it() -> None:
    cert = ServingCert(NOW + 3 * DAY + 600, "CN=x")
    assert remaining(cert, NOW) == "in 3 days"
    assert remaining(cert, NOW + 2 * DAY + 601) == "in 23 hours"
    assert remaining(cert, NOW + 3 * DAY) == "in less than an hour"
    assert remaining(cert, NOW + 5 * DAY) == "expired 1 day ago"
    assert cert.expires == "1970-01-15 13:56 UTC"


def test_only_https_urls_are_probed_peer_and_client() -> None:
    members = [Member(1, "m1", ("https://10.0.0.1:2380",), ("https://10.0.0.1:2379", "http://10.0.0.1:4001")),
               Member(2, "", ("https://10.0.0.2:2380",), ()),  # added, not started: its peer URL serves later
               Member(3, "m3", ("http://10.0.0.3:2380",), ("http://10.0.0.3:2379",))]
    assert tls_urls(members) == [("m1", "client", "https://10.0.0.1:2379"), ("m1", "peer", "https://10.0.0.1:2380"),
                                 ("0000000000000002", "peer", "https://10.0.0.2:2380")]


def test_a_certificate_is_parsed_for_its_expiry_subject_and_names(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    files = certs.generate(tmp_path, hosts=("127.0.0.1", "etcd-1.example"), valid_days=3)
    pem = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert = parse_der(pem.public_bytes(serialization.Encoding.DER))
    assert 3 * DAY - 120 < cert.seconds_left(time.time()) <= 3 * DAY
    assert cert.subject == "CN=etcd-member"
    assert set(cert.sans) == {"127.0.0.1", "etcd-1.example"}


# ---------------------------------------------------------------- real members

async def test_every_members_client_and_peer_certificate_is_read_and_a_silent_one_costs_one_deadline(
        make_cluster) -> None:
    c = make_cluster(3, tls=True, cert_days=3)
    members = [Member(i, name, (m.peer_url,), (m.client_url,)) for i, (name, m) in enumerate(c.members.items(), 1)]
    files = c.tls_files()
    c.pause("member3")
    try:
        started = time.monotonic()
        readings = await read_certs(tls_urls(members), files, timeout=1.0, now=time.time())
        elapsed = time.monotonic() - started
    finally:
        c.resume("member3")
    by = {(r.member, r.kind): r for r in readings}
    assert set(by) == {(f"member{i}", k) for i in (1, 2, 3) for k in ("client", "peer")}
    for i in (1, 2):
        for kind in ("client", "peer"):
            cert = by[(f"member{i}", kind)].cert
            assert cert is not None, by[(f"member{i}", kind)].error
            assert 2.9 * DAY < cert.seconds_left(time.time()) <= 3 * DAY and "127.0.0.1" in cert.sans
    assert by[("member3", "peer")].cert is None and "no TLS handshake within 1s" in str(by[("member3", "peer")].error)
    assert elapsed < 2.5, f"the black-holed member cost {elapsed:.1f}s: its URLs are asked at once, under one deadline"
    # peer URLs demand a client certificate: without the configured one, the reading says so
    no_client_cert = await read_certs([("member1", "peer", c.member("member1").peer_url)], TLSFiles(), 2.0, time.time())
    assert no_client_cert[0].cert is None and "client certificate" in str(no_client_cert[0].error)
    assert len(expiring(readings, time.time(), 14 * DAY)) == 4
