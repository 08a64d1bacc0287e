"""TLS and mutual TLS on the real runtime binary, with certificates made by
the openssl CLI, driven by independent grpcio clients, the aipod Python
client and the aipod CLI. Run by .ci/test."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aipod import CallError, Client, RetryPolicy
from runtime_process import BINARY, RuntimeProcess

ROOT = Path(__file__).resolve().parents[3]
CLI = Path(os.environ.get("AIPOD_CLI_BIN", ROOT / "target" / "debug" / "aipod"))
NO_RETRY = RetryPolicy(attempts=1)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}", cwd=d)


def _leaf(d: Path, name: str, ca: str, ext: str, subject: str | None = None) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject or f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d)


SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
CLIENT_EXT = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", SERVER_EXT)
    _leaf(d, "server2", "ca", SERVER_EXT)
    _leaf(d, "client", "ca", CLIENT_EXT)
    _leaf(d, "stranger", "other-ca", CLIENT_EXT)
    # The subject of "client", from another CA.
    _leaf(d, "twin", "other-ca", CLIENT_EXT, subject="/CN=client")
    (d / "both-cas.pem").write_bytes((d / "ca.pem").read_bytes() + (d / "other-ca.pem").read_bytes())
    return d


def _tls_args(pki: Path, *extra: str) -> list[str]:
    return ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), *extra]


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _creds(pki: Path, ca: str = "ca", client: str | None = None) -> grpc.ChannelCredentials:
    key = (pki / f"{client}.key").read_bytes() if client else None
    chain = (pki / f"{client}.pem").read_bytes() if client else None
    return grpc.ssl_channel_credentials((pki / f"{ca}.pem").read_bytes(), key, chain)


def test_tls_serves_only_tls_and_a_plaintext_health_port(pki):
    rt = RuntimeProcess(*_tls_args(pki), "--health-listen", "127.0.0.1:0")
    try:
        assert rt.health, "the health port is reported"
        assert any(e.get("tls") == "on" for e in rt.log if e.get("message") == "aipod-runtime listening")
        # The right CA: grpcio, the aipod Python client, the aipod CLI.
        with grpc.secure_channel(f"localhost:{rt.port}", _creds(pki)) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        with Client(f"https://localhost:{rt.port}", ca=pki / "ca.pem") as client:
            assert client.call("sha256", data=b"abc").value["size"] == 3
        cli = subprocess.run([str(CLI), "call", f"https://localhost:{rt.port}", "-f", "echo", "-q", "--ca",
                              str(pki / "ca.pem")], capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        # A wrong CA fails the handshake.
        with grpc.secure_channel(f"localhost:{rt.port}", _creds(pki, ca="other-ca")) as ch:
            with pytest.raises(grpc.RpcError) as e:
                _health(ch)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        cli = subprocess.run([str(CLI), "call", f"https://localhost:{rt.port}", "-f", "echo", "-q", "--attempts",
                              "1", "--ca", str(pki / "other-ca.pem")], capture_output=True, text=True, timeout=30)
        assert cli.returncode != 0 and "certificate" in cli.stderr.lower(), cli.stderr
        # Plaintext to the TLS port fails; never answered in the clear.
        with grpc.insecure_channel(rt.addr) as ch:
            with pytest.raises(grpc.RpcError) as e:
                _health(ch)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # The health port answers in plaintext, and serves health only.
        with grpc.insecure_channel(rt.health) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            describe = ch.unary_unary("/ai.AI/describe", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as e:
                describe(b"", timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        assert rt.stop() == 0


def _served_serial(port: int, pki: Path) -> int:
    """The serial number of the certificate a new connection is served."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"], input=der,
                         capture_output=True, check=True)
    return int(out.stdout.decode().strip().split("=")[1], 16)


def _serial(path: Path) -> int:
    out = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-serial"], capture_output=True, check=True)
    return int(out.stdout.decode().strip().split("=")[1], 16)


def test_replaced_certificate_files_are_served_without_a_restart(pki, tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki / "server.pem", cert)
    shutil.copy(pki / "server.key", key)
    rt = RuntimeProcess("--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert _served_serial(rt.port, pki) == _serial(pki / "server.pem")
        # What a Secret volume does: both files replaced.
        shutil.copy(pki / "server2.key", key)
        shutil.copy(pki / "server2.pem", cert)
        deadline = time.monotonic() + 10
        while _served_serial(rt.port, pki) != _serial(pki / "server2.pem"):
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.2)
        assert any(e.get("message") == "TLS certificate reloaded" for e in rt.log), rt.log
        # A broken pair (a key that is not the certificate's) keeps the old one.
        shutil.copy(pki / "client.key", key)
        time.sleep(2.5)
        assert _served_serial(rt.port, pki) == _serial(pki / "server2.pem")
        assert any("cannot be used" in e.get("message", "") for e in rt.log), rt.log
    finally:
        rt.stop()


def test_mutual_tls_wants_a_certificate_from_the_client_ca(pki):
    rt = RuntimeProcess(*_tls_args(pki, "--tls-client-ca", str(pki / "ca.pem")))
    try:
        assert any(e.get("tls") == "mutual" for e in rt.log if e.get("message") == "aipod-runtime listening")
        for client in (None, "stranger"):
            with grpc.secure_channel(f"localhost:{rt.port}", _creds(pki, client=client)) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    _health(ch)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, client
        with grpc.secure_channel(f"localhost:{rt.port}", _creds(pki, client="client")) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        with Client(f"https://localhost:{rt.port}", ca=pki / "ca.pem", cert=pki / "client.pem",
                    key=pki / "client.key") as client:
            assert client.call("sha256", data=b"abcd").value["size"] == 4
        with Client(f"https://localhost:{rt.port}", ca=pki / "ca.pem", retry=NO_RETRY) as client:
            with pytest.raises(CallError) as err:
                client.call("echo")
            assert err.value.code == "UNAVAILABLE"
        cli = subprocess.run([str(CLI), "call", f"https://localhost:{rt.port}", "-f", "echo", "-q", "--ca",
                              str(pki / "ca.pem"), "--cert", str(pki / "client.pem"), "--key",
                              str(pki / "client.key")], capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        assert any(e.get("message", "").startswith("TLS handshake failed") for e in rt.log), rt.log
    finally:
        rt.stop()


def test_the_same_subject_from_another_ca_does_not_share_retained_calls(pki):
    rt = RuntimeProcess(*_tls_args(pki, "--tls-client-ca", str(pki / "both-cas.pem")))
    call_id = "retained-by-client-0123456789abcdef"

    def client(name: str) -> Client:
        return Client(f"https://localhost:{rt.port}", ca=pki / "ca.pem", cert=pki / f"{name}.pem",
                      key=pki / f"{name}.key", retry=NO_RETRY)

    try:
        with client("client") as c:
            assert c.call("echo", {"n": 1}, data=b"mine", retain=60, call_id=call_id).payload == b"mine"
            assert c.attach(call_id).payload == b"mine", "its own identity attaches"
        with client("twin") as c:
            with pytest.raises(CallError) as err:
                c.attach(call_id)
            assert err.value.code == "NOT_FOUND", "a twin subject from another CA is another identity"
    finally:
        rt.stop()


def test_silent_connections_from_one_address_do_not_hold_up_other_handshakes(pki):
    rt = RuntimeProcess(*_tls_args(pki))
    silent: list[socket.socket] = []
    try:
        # 300 connections that never send a ClientHello, from 127.0.0.2:
        # more than all handshake slots (256) if one peer could take them.
        for _ in range(300):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", rt.port))
            silent.append(s)
        started = time.monotonic()
        with grpc.secure_channel(f"localhost:{rt.port}", _creds(pki)) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        took = time.monotonic() - started
        assert took < 1.5, f"a handshake from another address waited {took:.1f}s behind silent connections"
        # The silent ones are closed at the ClientHello deadline (2 s), not
        # after the 10 s a handshake may take.
        time.sleep(3)
        for s in silent[:40]:
            s.settimeout(2)
            try:
                assert s.recv(1) == b"", "a silent connection is still open"
            except ConnectionResetError:
                pass
        assert any("no ClientHello within 2 s" in e.get("message", "") or "handshakes from this address" in
                   e.get("message", "") for e in rt.log), rt.log[-5:]
    finally:
        for s in silent:
            s.close()
        rt.stop()


@pytest.mark.parametrize("case", ["key-mismatch", "unreadable-key", "empty-cert", "ca-without-cert", "cert-only"])
def test_bad_tls_configuration_refuses_to_start_naming_the_flag_and_file(pki, tmp_path, case):
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    args = {
        "key-mismatch": ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "client.key")],
        "unreadable-key": ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(tmp_path / "missing.key")],
        "empty-cert": ["--tls-cert", str(empty), "--tls-key", str(pki / "server.key")],
        "ca-without-cert": ["--tls-client-ca", str(pki / "ca.pem")],
        "cert-only": ["--tls-cert", str(pki / "server.pem")],
    }[case]
    want = {
        "key-mismatch": ("--tls-key", "client.key"),
        "unreadable-key": ("--tls-key", "missing.key"),
        "empty-cert": ("--tls-cert", "empty.pem"),
        "ca-without-cert": ("--tls-client-ca", "ca.pem"),
        "cert-only": ("--tls-cert", "server.pem"),
    }[case]
    done = subprocess.run([str(BINARY), "--listen", "127.0.0.1:0", *args], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "error" in line]
    assert errors and all(w in errors[-1] for w in want), done.stderr
