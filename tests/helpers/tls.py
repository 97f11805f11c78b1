"""Throw-away X.509 certificates for TLS tests, made with the openssl CLI.

Laid out as libnbd, qemu and nbdkit expect a certificates directory:
ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# gnutls (libnbd, qemu, nbdkit) checks key usages strictly: spell them all out.
_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(work: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-days", "2",
             "-subj", f"/CN={name}", "-config", "openssl.cnf", "-extensions", "ca_ext", cwd=work)


def _make_leaf(work: Path, ca: str, name: str, cn: str, ext: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
             "-config", "openssl.cnf", cwd=work)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey",
             f"{ca}-key.pem", "-CAcreateserial", "-days", "2", "-out", f"{name}-cert.pem",
             "-extfile", "openssl.cnf", "-extensions", ext, cwd=work)


@dataclass(frozen=True)
class Certificates:
    """Certificate directories for the tests; CA keys stay outside all of them."""

    good: Path  # the CA, the server's pair and a client pair it signed
    no_client: Path  # the CA only: a client without a certificate of its own
    rogue_client: Path  # the CA, and a client pair signed by another CA
    other_ca: Path  # another CA only: a client that does not trust the server

    def file(self, name: str) -> str:
        return str(self.good / name)


def make_certificates(root: Path) -> Certificates:
    work = root / "work"
    work.mkdir(parents=True)
    (work / "openssl.cnf").write_text(_CONFIG)
    _make_ca(work, "ca")
    _make_ca(work, "other-ca")
    _make_leaf(work, "ca", "server", "localhost", "server_ext")
    _make_leaf(work, "ca", "client", "client", "client_ext")
    _make_leaf(work, "other-ca", "rogue", "client", "client_ext")

    def directory(name: str, files: dict[str, str]) -> Path:
        d = root / name
        d.mkdir()
        for target, source in files.items():
            shutil.copy(work / source, d / target)
        return d

    return Certificates(
        good=directory("good", {"ca-cert.pem": "ca-cert.pem", "server-cert.pem": "server-cert.pem",
                                "server-key.pem": "server-key.pem",
                                "client-cert.pem": "client-cert.pem",
                                "client-key.pem": "client-key.pem"}),
        no_client=directory("no-client", {"ca-cert.pem": "ca-cert.pem"}),
        rogue_client=directory("rogue-client", {"ca-cert.pem": "ca-cert.pem",
                                                "client-cert.pem": "rogue-cert.pem",
                                                "client-key.pem": "rogue-key.pem"}),
        other_ca=directory("other-ca", {"ca-cert.pem": "other-ca-cert.pem"}),
    )
