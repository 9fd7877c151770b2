"""Development credentials (deploy/credentials.py): what Flower's SuperLink, SuperNode and
CLI will load, and a chain that verifies."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.credentials import main, make_all


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    files = make_all(tmp_path, nodes=0, hosts=["localhost", "127.0.0.1", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("10.1.2.3")]
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for private in (files.ca_key, files.server_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_node_keys_load_as_flower_loads_them(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    files = make_all(tmp_path, nodes=2)
    for i in range(2):
        private = serialization.load_ssh_private_key(files.node_key(i).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)  # as flower-supernode checks
        assert try_load_public_key(files.node_public_key(i))  # as flwr supernode register does
    assert files.node_public_key(0).read_bytes() != files.node_public_key(1).read_bytes()


def test_existing_credentials_are_never_overwritten(tmp_path, capsys):
    make_all(tmp_path, nodes=1)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--nodes", "1"])
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "ca.key").read_bytes() == before
