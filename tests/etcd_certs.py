"""A throwaway PKI for TLS tests: a CA, server and client certificates, and a second CA that
the servers do not trust."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertPaths:
    """Throwaway PKI written by :func:`make_certs` (all PEM)."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A second CA nobody trusts, and a client cert it signed.
    other_ca_cert: Path
    other_ca_key: Path
    other_client_cert: Path
    other_client_key: Path


def make_certs(directory: str | Path) -> CertPaths:
    """Create a CA, a server cert (SAN 127.0.0.1 + localhost), a client cert and an untrusted CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    def key() -> ec.EllipticCurvePrivateKey:
        # EC keys generate in microseconds; RSA-2048 would cost ~100 ms each.
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path: Path, k: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        path.with_suffix(".key").write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False
            )
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def make_leaf(
        cn: str,
        ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
        *,
        server: bool,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca[1].subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()),
                critical=False,
            )
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        return k, b.sign(ca[0], hashes.SHA256())

    ca = make_ca("rdzv-test-ca")
    other = make_ca("rdzv-untrusted-ca")
    write(d / "ca.crt", *ca)
    write(d / "server.crt", *make_leaf("localhost", ca, server=True))
    write(d / "client.crt", *make_leaf("rdzv-client", ca, server=False))
    write(d / "other-ca.crt", *other)
    write(d / "other-client.crt", *make_leaf("rdzv-client", other, server=False))
    return CertPaths(
        dir=d,
        ca_cert=d / "ca.crt",
        ca_key=d / "ca.key",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        other_ca_cert=d / "other-ca.crt",
        other_ca_key=d / "other-ca.key",
        other_client_cert=d / "other-client.crt",
        other_client_key=d / "other-client.key",
    )


