"""Development credentials for a deployment: a CA, a SuperLink certificate, SuperNode keys.

    python -m deploy.credentials certificates --nodes 3
    python -m deploy.credentials certificates --nodes 3 --hosts localhost 127.0.0.1 10.0.0.5

Writes, with the ``cryptography`` package (no network, no openssl binary):

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (ECDSA P-384, 1 year);
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by that CA, valid
  for the given host names and IP addresses (``--hosts``; every address the SuperNodes
  and the ``flwr`` CLI use to reach the SuperLink must be listed);
- ``node-<i>`` / ``node-<i>.pub``: one EC key pair (NIST P-384, OpenSSH format) per
  SuperNode, for Flower's SuperNode authentication: the public key is registered with
  ``flwr supernode register``, the private key given to ``flower-supernode
  --auth-supernode-private-key``.

These are for development and testing: a production deployment takes its certificates
from its own PKI and keeps every private key on the machine that uses it. Existing files
are never overwritten (``--force`` to replace them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TLSFiles:
    """Where a credentials folder keeps each file."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, index: int) -> Path:
        return self.root / f"node-{index}"

    def node_public_key(self, index: int) -> Path:
        return self.root / f"node-{index}.pub"


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (use --force)")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(files: TLSFiles, *, force: bool = False) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-app development CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write(files.ca_key, _pem_key(key), private=True, force=force)
    _write(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    return key, cert


def make_server_cert(files: TLSFiles, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: list[str], *, force: bool = False) -> None:
    if not hosts:
        raise ValueError("The server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(files.server_key, _pem_key(key), private=True, force=force)
    _write(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)


def make_node_key(files: TLSFiles, index: int, *, force: bool = False) -> None:
    """An EC (NIST P-384) key pair in OpenSSH format, as Flower's SuperNode auth reads it."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(files.node_key(index), private, private=True, force=force)
    _write(files.node_public_key(index), public + f" node-{index}\n".encode(), private=False,
           force=force)


def make_all(root: Path, *, nodes: int, hosts: list[str] | None = None,
             force: bool = False) -> TLSFiles:
    files = TLSFiles(Path(root))
    files.root.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(files, force=force)
    make_server_cert(files, ca_key, ca_cert, list(hosts or DEFAULT_HOSTS), force=force)
    for index in range(nodes):
        make_node_key(files, index, force=force)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the credentials into")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    parser.add_argument("--hosts", nargs="+", default=list(DEFAULT_HOSTS),
                        help="names and IP addresses the SuperLink is reached at")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    if args.nodes < 0:
        parser.error(f"--nodes must be >= 0, got {args.nodes}")
    try:
        files = make_all(args.out, nodes=args.nodes, hosts=args.hosts, force=args.force)
    except FileExistsError as err:
        parser.error(str(err))
    print(f"CA {files.ca_cert}, SuperLink certificate {files.server_cert} for {args.hosts}, "
          f"{args.nodes} SuperNode key pair(s) node-<i>/node-<i>.pub in {files.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
