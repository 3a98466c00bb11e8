"""The runtime's optional TLS (``node.serve_tls``, ``node.call(…, tls=…)``,
``node.peer_certificate``), with two nodes in this process and certificates made here."""

from __future__ import annotations

import asyncio
import datetime
import io
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sandboxes.runtime.node import CallError, Node, Peer, Request, Response
from sandboxes.runtime.telemetry import Telemetry
from sandboxes.runtime.testing import free_port

PEM = serialization.Encoding.PEM


def name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def certificate(
    folder: Path, who: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None
) -> tuple[str, str, ec.EllipticCurvePrivateKey]:
    """A key and a certificate for ``who`` (self-signed when ``issuer`` is None): paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(who))
        .issuer_name(issuer[0] if issuer else name(who))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(minutes=10))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer:
        uri = x509.UniformResourceIdentifier(f"spiffe://test/{who}")
        builder = builder.add_extension(x509.SubjectAlternativeName([uri]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_path, key_path = folder / f"{who}.pem", folder / f"{who}.key"
    cert_path.write_bytes(cert.public_bytes(PEM))
    key_path.write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path), key


def context(purpose: int, ca: str, cert: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=ca)
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def run_pair(
    tmp_path: Path, check: Callable[[Node, dict[str, ssl.SSLContext]], Awaitable[None]]
) -> None:
    ca_cert, _, ca_key = certificate(tmp_path, "ca", None)
    issuer = (name("ca"), ca_key)
    server_cert = certificate(tmp_path, "server", issuer)[:2]
    client_cert = certificate(tmp_path, "client", issuer)[:2]
    other_ca = certificate(tmp_path, "other-ca", None)[0]
    contexts = {
        "server": context(ssl.PROTOCOL_TLS_SERVER, ca_cert, server_cert),
        "client": context(ssl.PROTOCOL_TLS_CLIENT, ca_cert, client_cert),
        "anonymous": context(ssl.PROTOCOL_TLS_CLIENT, ca_cert, None),
        "distrusting": context(ssl.PROTOCOL_TLS_CLIENT, other_ca, client_cert),
    }
    listen = f"127.0.0.1:{free_port()}"
    peers = [Peer("server", "server", listen), Peer("client", "client", "127.0.0.1:1")]

    def make(who: str, address: str) -> Node:
        return Node(
            name=who,
            role=who,
            pattern="test",
            sandbox="test",
            listen=address,
            peers=peers,
            env={},
            telemetry=Telemetry(who, io.BytesIO()),
        )

    server = make("server", listen)
    server.serve_tls(contexts["server"])

    @server.route("/who")
    async def who(request: Request) -> Response:
        cert = server.peer_certificate(request)
        return server.json({"san": cert.get("subjectAltName", [])})

    client = make("client", f"127.0.0.1:{free_port()}")

    async def main() -> None:
        await server.start()
        await client.start()
        try:
            await check(client, contexts)
        finally:
            await client.stop()
            await server.stop()

    asyncio.run(main())


def test_a_tls_call_carries_the_callers_certificate_to_the_program(tmp_path: Path) -> None:
    async def check(client: Node, contexts: dict[str, ssl.SSLContext]) -> None:
        reply = await client.call("server", "/who", tls=contexts["client"])
        assert reply.status == 200
        assert reply.json()["san"] == [["URI", "spiffe://test/client"]]

    run_pair(tmp_path, check)


@pytest.mark.parametrize(
    ("who", "detail"),
    [
        ("anonymous", "reset during the handshake"),  # the server wants a certificate
        ("distrusting", "self-signed certificate in certificate chain"),
    ],
)
def test_a_refused_handshake_is_a_tls_failure_saying_why(
    tmp_path: Path, who: str, detail: str
) -> None:
    async def check(client: Node, contexts: dict[str, ssl.SSLContext]) -> None:
        with pytest.raises(CallError) as failed:
            await client.call("server", "/who", tls=contexts[who])
        assert (failed.value.reason, failed.value.detail) == ("tls", detail)

    run_pair(tmp_path, check)


def test_a_plain_call_to_a_tls_server_gets_no_answer(tmp_path: Path) -> None:
    async def check(client: Node, contexts: dict[str, ssl.SSLContext]) -> None:
        with pytest.raises(CallError) as failed:
            await client.call("server", "/who", timeout=1.0)
        assert failed.value.reason in ("disconnected", "error")

    run_pair(tmp_path, check)
