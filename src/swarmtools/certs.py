"""A cluster CA and host certificates for mutual TLS in tests and demos (tls.py).

    python -m swarmtools.certs DIR NAME[=IP,...] ...

writes DIR/ca.pem and, per host, DIR/NAME.pem and DIR/NAME.key (ECDSA P-256, valid
for a day; the IPs, if given, as subject alternative names). Production clusters
use their own PKI: see README, "Mutual TLS".
"""

from __future__ import annotations

import argparse
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
    """A certificate and its key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class HostFiles:
    """One host's files: what its [security] tls_cert, tls_key and tls_ca name."""

    cert: Path
    key: Path
    ca: Path

    def security(self) -> dict[str, str]:
        """The [security] keys of a config using these files."""
        return {"tls_cert": str(self.cert), "tls_key": str(self.key), "tls_ca": str(self.ca)}


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(common: str = "swarmcache test CA") -> Issued:
    """A self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
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
    return Issued(cert, key)


def issue(ca: Issued, common: str, ips: tuple[str, ...] = ()) -> Issued:
    """A host certificate signed by `ca`, good as TLS server and client."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(common)]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def write_ca(ca: Issued, path: Path) -> Path:
    """Write the CA's certificate (PEM)."""
    path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_host(
    ca: Issued, ca_path: Path, folder: Path, common: str, ips: tuple[str, ...] = ()
) -> HostFiles:
    """Issue a host certificate and write it and its key to `folder` (the key 0600)."""
    issued = issue(ca, common, ips)
    cert = folder / f"{common}.pem"
    key = folder / f"{common}.key"
    cert.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    key.touch(mode=0o600)
    key.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return HostFiles(cert, key, ca_path)


def main(argv: list[str] | None = None) -> None:
    """Write a CA and host certificates (see the module's docstring)."""
    p = argparse.ArgumentParser(prog="python -m swarmtools.certs", description=__doc__)
    p.add_argument("dir", type=Path)
    p.add_argument("hosts", nargs="+", metavar="NAME[=IP,...]")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    ca_path = write_ca(ca, args.dir / "ca.pem")
    for spec in args.hosts:
        name, _, ips = spec.partition("=")
        files = write_host(ca, ca_path, args.dir, name, tuple(filter(None, ips.split(","))))
        print(f"{name}: {files.cert} {files.key}")
    print(f"CA: {ca_path}")


if __name__ == "__main__":
    main()
