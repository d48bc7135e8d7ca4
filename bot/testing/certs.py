"""A throw-away CA with server and client certificates for mutual-TLS test clusters.

The etcd behind Kubernetes requires client certificates; the local cluster
generates its own so tests exercise the same code path. Needs the
`cryptography` package. Certificates are valid for a year unless asked
otherwise (`valid_days`: a short-lived one is what the watch warns about).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

# The private keys generated in this process (their base64 lines), so tests can prove none leaked.
KEY_MATERIAL: list[str] = []


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def generate(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
             valid_days: float = 365.0) -> CertFiles:
    """Write a CA, a server/peer certificate for `hosts` and a client certificate, valid for `valid_days`."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("TLS test clusters need the 'cryptography' package "
                           "(pip install 'etcd-chatops[test]')") from e

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    until = now + dt.timedelta(days=valid_days)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(path: Path, k: ec.EllipticCurvePrivateKey) -> None:
        data = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
        KEY_MATERIAL.extend(line for line in data.decode().splitlines() if line and not line.startswith("-----"))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def write_cert(path: Path, cert: x509.Certificate) -> None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("etcd-chatops test CA")).issuer_name(name("etcd-chatops test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usages: list[x509.ObjectIdentifier], sans: list[x509.GeneralName]
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(k.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), k

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server, server_key = leaf("etcd-member", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans)
    client, client_key = leaf("etcd-chatops", [ExtendedKeyUsageOID.CLIENT_AUTH], [])

    files = CertFiles(ca=directory / "ca.crt", server_cert=directory / "server.crt",
                      server_key=directory / "server.key", client_cert=directory / "client.crt",
                      client_key=directory / "client.key")
    write_cert(files.ca, ca)
    write_cert(files.server_cert, server)
    write_key(files.server_key, server_key)
    write_cert(files.client_cert, client)
    write_key(files.client_key, client_key)
    return files
