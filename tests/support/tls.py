"""Certificates made by a test: a CA, a server certificate for 127.0.0.1, client certificates.

Made with ``cryptography`` (EC P-256 keys, valid for a day); files are written owner-only.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA that issues certificates into a folder."""

    name: str
    folder: Path
    _key: ec.EllipticCurvePrivateKey
    _cert: x509.Certificate

    @property
    def cert(self) -> Path:
        """The CA certificate's PEM file."""
        return self.folder / f"{self.name}-ca.pem"

    def issue(self, name: str, *, server: bool) -> Issued:
        """A certificate for ``name`` (a server's for 127.0.0.1, or a client's), with its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _builder(name, self._cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return _write(self.folder, name, key, cert)

    def client_context(self, client: Issued | None, trust: Path | None = None) -> ssl.SSLContext:
        """A client's TLS context trusting ``trust`` (this CA), presenting ``client`` if given."""
        context = ssl.create_default_context(cafile=str(trust or self.cert))
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return context


def certificate_authority(folder: Path, name: str) -> Authority:
    """A new self-signed CA whose certificate is written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    cert = (
        _builder(f"{name} test CA", subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .sign(key, hashes.SHA256())
    )
    authority = Authority(name=name, folder=folder, _key=key, _cert=cert)
    authority.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return authority


def _builder(
    common_name: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
    )


def _write(
    folder: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Issued:
    issued = Issued(cert=folder / f"{name}.pem", key=folder / f"{name}-key.pem")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    issued.key.touch(mode=0o600)
    issued.key.chmod(0o600)
    issued.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return issued
