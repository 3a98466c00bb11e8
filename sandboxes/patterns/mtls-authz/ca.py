"""The certificate authority and the mesh's control plane (chapter 10).

At start it makes its own key and a self-signed root certificate. Each workload sends it a
certificate signing request (CSR) for its SPIFFE ID, ``spiffe://<trust domain>/<name>``,
and gets back a certificate that lives ``cert_ttl_s`` seconds. The CA signs only a CSR
whose ID names the caller (``X-Distlab-From``): a stand-in for workload attestation, which
a real CA (SPIRE, a mesh's istiod) does with the platform's help.

It also publishes, at ``GET /bundle``, what every node polls each second: the root
certificate (the trust bundle), the certificate revocation list (CRL), the mesh's mTLS
mode and policy mode, and rotation requests. The learner's controls land here:

- ``cert_ttl_s``: the lifetime of certificates issued from now on (every node renews at
  once, so the new lifetime applies everywhere within a second or two),
- ``mtls``: ``strict`` (a caller must present a certificate) or ``permissive`` (one without
  is let in, and only the policy can stop it),
- ``policy``: ``enforce`` (denied calls get 403) or ``log only`` (logged, then served),
- ``revoke``: revoke the certificate a node holds now (it is listed in the CRL),
- ``rotate``: ask a node to renew its certificate now.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sandboxes.runtime.node import Node, Request, Response

WORKLOADS = ["none", "client", "gateway", "orders", "inventory", "reporting"]
PEM = serialization.Encoding.PEM


def setup(node: Node) -> None:
    domain = node.param("trust_domain", "sandbox.distlab")
    key = ec.generate_private_key(ec.SECP256R1())
    # A new root each start, with a name of its own: a restarted CA is another CA, whose
    # root the workloads add to the ones they trust (and then renew from it).
    started = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{domain} CA {started}")])
    now = datetime.datetime.now(datetime.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    root_pem = root.public_bytes(PEM).decode()
    issued: dict[int, dict[str, Any]] = {}  # serial → subject, expires (Unix s), revoked
    rotate: dict[str, int] = {}  # node → how many times it was asked to renew
    crl = {"version": 0, "pem": ""}

    def publish_crl() -> None:
        """Sign a new CRL listing every revoked certificate that has not expired yet."""
        moment = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(name)
            .last_update(moment - datetime.timedelta(seconds=1))
            .next_update(moment + datetime.timedelta(days=1))
        )
        for serial, cert in issued.items():
            if cert["revoked"] and cert["expires"] > time.time():
                entry = x509.RevokedCertificateBuilder().serial_number(serial)
                builder = builder.add_revoked_certificate(entry.revocation_date(moment).build())
        crl["pem"] = builder.sign(key, hashes.SHA256()).public_bytes(PEM).decode()
        crl["version"] += 1

    def on_revoke(target: str, previous: str) -> None:
        for serial, cert in issued.items():
            if cert["subject"] == target and not cert["revoked"] and cert["expires"] > time.time():
                cert["revoked"] = True
                node.event("revoked", subject=target, serial=f"{serial:x}"[:8])
        publish_crl()

    def on_rotate(target: str, previous: str) -> None:
        if target != "none":
            rotate[target] = rotate.get(target, 0) + 1

    def on_lifetime(value: float, previous: float) -> None:
        for workload in WORKLOADS[1:]:  # everyone renews now, under the new lifetime
            rotate[workload] = rotate.get(workload, 0) + 1

    node.setting("cert_ttl_s", 120, minimum=10, maximum=86400, on_change=on_lifetime)
    node.setting("mtls", "strict", choices=["strict", "permissive"])
    node.setting("policy", "enforce", choices=["enforce", "log only"])
    node.setting("revoke", "none", choices=WORKLOADS, on_change=on_revoke)
    node.setting("rotate", "none", choices=WORKLOADS, on_change=on_rotate)
    publish_crl()

    @node.route("/sign", method="POST")
    async def sign(request: Request) -> Response:
        caller = request.headers.get("X-Distlab-From", "")
        csr = x509.load_pem_x509_csr((await request.json())["csr"].encode())
        spiffe_id = f"spiffe://{domain}/{caller}"
        wanted = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = wanted.value.get_values_for_type(x509.UniformResourceIdentifier)
        if not caller or uris != [spiffe_id] or not csr.is_signature_valid:
            return node.json({"error": f"{caller or 'nobody'} may not have {uris}"}, status=403)
        lifetime = int(node.config["cert_ttl_s"])
        moment = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, caller)]))
            .issuer_name(name)
            .public_key(csr.public_key())
            .serial_number(serial)
            .not_valid_before(moment - datetime.timedelta(seconds=5))
            .not_valid_after(moment + datetime.timedelta(seconds=lifetime))
            .add_extension(wanted.value, critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        issued[serial] = {"subject": caller, "expires": time.time() + lifetime, "revoked": False}
        for old in [s for s, c in issued.items() if c["expires"] < time.time() - 60]:
            del issued[old]  # long expired: nobody can use them any more
        node.event("issued", subject=caller, serial=f"{serial:x}"[:8], lifetime_s=lifetime)
        return node.json({"certificate": cert.public_bytes(PEM).decode(), "lifetime_s": lifetime})

    @node.route("/bundle")
    async def bundle(request: Request) -> Response:
        return node.json(
            {
                "root": root_pem,
                "crl": crl["pem"],
                "crl_version": crl["version"],
                "mtls": node.config["mtls"],
                "policy": node.config["policy"],
                "rotate": rotate,
            }
        )

    @node.task
    async def report() -> None:
        await asyncio.sleep(0.5)  # once the runtime has said "started", which resets states
        while True:
            node.set_state("mtls", node.config["mtls"])
            node.set_state("policy", node.config["policy"].replace(" ", "-"))
            rows, now_s = [], time.time()
            for serial, cert in sorted(issued.items(), key=lambda item: -item[1]["expires"]):
                left = cert["expires"] - now_s
                status = "revoked" if cert["revoked"] else "valid" if left > 0 else "expired"
                rows.append(
                    {
                        "serial": f"{serial:x}"[:8],
                        "subject": f"spiffe://{domain}/{cert['subject']}",
                        "issuer": "sandbox CA",
                        "expires_in_s": round(max(left, 0)),
                        "status": status,
                    }
                )
            node.table("certificates", rows[:20])
            node.gauge("valid_certificates", sum(r["status"] == "valid" for r in rows))
            await asyncio.sleep(1)
