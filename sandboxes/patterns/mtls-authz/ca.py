"""The certificate authority, the token issuer and the mesh's control plane (chapter 10).

At start it makes its own key and a self-signed root certificate. Each workload sends it a
certificate signing request (CSR) for its SPIFFE ID, ``spiffe://<trust domain>/<name>``,
and gets back a certificate that lives ``cert_ttl_s`` seconds. The CA signs only a CSR
whose ID names the caller (``X-Distlab-From``): a stand-in for workload attestation, which
a real CA (SPIRE, a mesh's istiod) does with the platform's help.

It also issues tokens (``GET /bundle?token=<audience>``, so that fetching one rides on the
call each node makes anyway): a JSON Web Token signed with its own key (ES256),
naming whom the caller acts for (``sub``), what they may do (``scope``), for which API
(``aud``) and until when (``iat``, ``exp``, by the CA's clock). The client and the auditor
get their user's token; gateway, orders and reporting get their own, with only the scopes
their own work needs (least privilege). The caller is again known by ``X-Distlab-From``,
where a real issuer would authenticate the user (a login) or the service (its certificate).

And it publishes, at ``GET /bundle``, what every node polls each second: the root
certificate (the trust bundle), the certificate revocation list (CRL), the mesh's mTLS
mode and policy mode, and rotation requests. The learner's controls land here:

- ``cert_ttl_s``: the lifetime of certificates issued from now on (every node renews at
  once, so the new lifetime applies everywhere within a second or two),
- ``mtls``: ``strict`` (a caller must present a certificate) or ``permissive`` (one without
  is let in, and only the policy can stop it),
- ``policy``: ``enforce`` (denied calls get 403) or ``log only`` (logged, then served),
- ``revoke``: revoke the certificate a node holds now (it is listed in the CRL),
- ``rotate``: ask a node to renew its certificate now,
- ``deputy``: the service that skips checking the user's token and calls on with its own
  token instead (the confused deputy),
- ``skew_node`` and ``skew_s``: whose clock is off, and by how much (the CA's own clock
  stamps certificates and tokens; a service's clock judges the tokens it is shown).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sandboxes.runtime.node import Node, Request, Response

WORKLOADS = ["none", "client", "gateway", "orders", "inventory", "reporting", "auditor"]
SERVICES = ["none", "gateway", "orders", "inventory"]  # the hops that check tokens
PEM = serialization.Encoding.PEM

# Who gets which token: (the subject it names, its scopes). The client shops for alice; the
# auditor may look but not buy; each service's own token allows only its own calls.
TOKENS = {
    "client": ("alice", ["checkout", "orders:write", "inventory:reserve"]),
    "auditor": ("auditor", ["checkout", "orders:read"]),
    "gateway": ("gateway", ["orders:write"]),
    "orders": ("orders", ["inventory:reserve"]),
    "reporting": ("reporting", ["orders:read"]),
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(key: ec.EllipticCurvePrivateKey, claims: dict[str, Any]) -> str:
    """A JSON Web Token (RFC 7519) signed with ES256: header.payload.signature."""
    header = b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    der = key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)  # JWS wants r and s side by side, 32 bytes each
    return f"{header}.{payload}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


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
    token_key = ec.generate_private_key(ec.SECP256R1())
    token_public = (
        token_key.public_key()
        .public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )

    def clock() -> float:
        """The CA's clock: the real time, unless the learner skewed it."""
        skewed = node.config["skew_node"] == "ca"
        return time.time() + (node.config["skew_s"] if skewed else 0)

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
    node.setting("deputy", "none", choices=SERVICES)
    node.setting("skew_node", "none", choices=["none", "ca", *SERVICES[1:]])
    node.setting("skew_s", 120, minimum=-3600, maximum=3600)
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
        moment = datetime.datetime.fromtimestamp(clock(), datetime.UTC)
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
        # The certificate's own dates, by the CA's clock: a skewed CA issues certificates
        # that are not valid yet (clock ahead) or expire early (clock behind).
        expires = moment.timestamp() + lifetime
        issued[serial] = {"subject": caller, "expires": expires, "revoked": False}
        for old in [s for s, c in issued.items() if c["expires"] < time.time() - 60]:
            del issued[old]  # long expired: nobody can use them any more
        node.event("issued", subject=caller, serial=f"{serial:x}"[:8], lifetime_s=lifetime)
        return node.json({"certificate": cert.public_bytes(PEM).decode(), "lifetime_s": lifetime})

    def token_for(caller: str, audience: str) -> dict[str, Any]:
        """A token for whom ``caller`` acts, dated by the CA's clock."""
        subject, scopes = TOKENS[caller]
        lifetime, issued_at = int(node.param("token_ttl_s", 60)), int(clock())
        claims = {
            "iss": f"spiffe://{domain}/ca",
            "sub": subject,
            "aud": audience,
            "scope": " ".join(scopes),
            "iat": issued_at,
            "exp": issued_at + lifetime,
        }
        return {"token": mint(token_key, claims), "token_lifetime_s": lifetime}

    @node.route("/bundle")
    async def bundle(request: Request) -> Response:
        caller = request.headers.get("X-Distlab-From", "")
        audience = request.query.get("token")
        token = token_for(caller, audience) if audience and caller in TOKENS else {}
        return node.json(
            {
                **token,
                "root": root_pem,
                "crl": crl["pem"],
                "crl_version": crl["version"],
                "mtls": node.config["mtls"],
                "policy": node.config["policy"],
                "rotate": rotate,
                "token_key": token_public,
                "deputy": node.config["deputy"],
                "skew": {node.config["skew_node"]: node.config["skew_s"]},
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
