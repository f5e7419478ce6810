"""Real X.509 material for the TLS tests, made with the ``cryptography`` package: a CA, a server
certificate for localhost / 127.0.0.1, a client certificate, an expired server certificate, and a
second, unrelated CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Material:
    ca: Path  # the CA that signed server, client and expired
    other_ca: Path  # a CA that signed nothing here
    server: Issued
    client: Issued
    client_of_other_ca: Issued
    expired_server: Issued


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    path.with_suffix(".crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return Issued(path.with_suffix(".crt"), path.with_suffix(".key"))


def _certificate(subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool = False,
                 server: bool = False, not_after_days: int = 30, not_before_days: int = -1):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now + datetime.timedelta(days=not_before_days))
               .not_valid_after(now + datetime.timedelta(days=not_after_days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_material(directory: Path) -> Material:
    ca_cert, ca_key = _certificate("mlipserve test CA", None, ca=True)
    other_cert, other_key = _certificate("unrelated CA", None, ca=True)
    ca = (ca_cert.subject, ca_key)
    other = (other_cert.subject, other_key)
    return Material(
        ca=_write(directory / "ca", ca_cert, ca_key).cert,
        other_ca=_write(directory / "other-ca", other_cert, other_key).cert,
        server=_write(directory / "server", *_certificate("localhost", ca, server=True)),
        client=_write(directory / "client", *_certificate("chemist", ca)),
        client_of_other_ca=_write(directory / "intruder", *_certificate("intruder", other)),
        expired_server=_write(directory / "expired", *_certificate("localhost", ca, server=True, not_after_days=-1,
                                                                  not_before_days=-10)),
    )
