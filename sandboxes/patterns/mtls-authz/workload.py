"""Every workload of the shop (chapter 10); the node's name says which part it plays:

- ``client`` sends checkouts to ``gateway`` (``POST /checkout``) at ``rps``,
- ``gateway`` passes each one to ``orders`` (``POST /orders``),
- ``orders`` reserves stock in ``inventory`` (``POST /reserve``) and lists its orders
  (``GET /orders``),
- ``reporting`` reads ``GET /orders`` every second, and tries ``POST /reserve`` on
  ``inventory`` every few seconds: the policy does not allow it,
- ``intruder`` has no certificate; switched on, it calls ``POST /orders`` twice a second.

Zero trust, at every hop: each workload has its own key and a short-lived certificate for
its SPIFFE ID from ``ca``, renewed at half its lifetime; every call between workloads is
mutual TLS (the standard library's ``ssl``: a fresh handshake per call, the peer's
certificate checked against the CA, its expiry and the CA's revocation list); and the
service that owns a route checks the caller's identity against ``POLICY`` before serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import ssl
import tempfile
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sandboxes.runtime.node import CallError, Node, Reply, Request, Response

# Deny by default: which identities may call each route of each service.
POLICY = {
    "POST /checkout": ["client"],  # served by gateway
    "POST /orders": ["gateway"],  # served by orders
    "GET /orders": ["reporting"],  # served by orders
    "POST /reserve": ["orders"],  # served by inventory
}

# The state panel's table of allowed and denied calls per caller, for each service.
AUTHZ_TABLES = {
    "gateway": "authz_gateway",
    "orders": "authz_orders",
    "inventory": "authz_inventory",
}


class Identity:
    """This node's key and certificate, the CA's root and revocation list, and the two
    TLS contexts built on them: ``server`` (for the calls it receives) and ``client``
    (for the calls it makes). Both are changed in place, so a renewed certificate or a
    new CRL applies from the next handshake on."""

    def __init__(self, node: Node, domain: str) -> None:
        self.node = node
        self.spiffe_id = f"spiffe://{domain}/{node.name}"
        self.folder = tempfile.mkdtemp(prefix="mtls-")  # private (0700), on the tmpfs
        self.server = self.context(ssl.PROTOCOL_TLS_SERVER)
        self.client = self.context(ssl.PROTOCOL_TLS_CLIENT)
        self.client.check_hostname = False  # a peer is known by its SPIFFE ID, not a host
        self.expires = 0.0  # when our certificate expires (0: none yet)
        self.expiry_told = False  # the event log was told it expired
        self.renew_at = 0.0
        self.root = ""  # the CA's root certificate (PEM)
        self.trusted = ""  # the root and CRL last loaded into the contexts
        self.rotations = 0

    @staticmethod
    def context(purpose: int) -> ssl.SSLContext:
        context = ssl.SSLContext(purpose)
        # TLS 1.2: a refused client certificate then fails the handshake itself (with
        # TLS 1.3 the client learns it only at its first read, as a broken connection).
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF  # a revoked peer is refused
        return context

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.folder, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
        return path

    def trust(self, bundle: dict[str, Any]) -> None:
        """Trust the CA's root and apply its latest revocation list and mTLS mode."""
        if bundle["root"] != self.root:  # the CA restarted: a new root, a new certificate
            self.root, self.renew_at = bundle["root"], 0.0
        if bundle["root"] + bundle["crl"] != self.trusted:
            path = self.write("bundle.pem", (bundle["root"] + bundle["crl"]).encode())
            for context in (self.server, self.client):
                context.load_verify_locations(cafile=path)
            self.trusted = bundle["root"] + bundle["crl"]
        strict = bundle["mtls"] == "strict"
        self.server.verify_mode = ssl.CERT_REQUIRED if strict else ssl.CERT_OPTIONAL

    async def renew(self) -> None:
        """A new key, a CSR for our SPIFFE ID, the CA's signature: a new certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(self.spiffe_id)])
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(san, critical=True)
            .sign(key, hashes.SHA256())
        )
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        reply = await self.node.call("ca", "/sign", method="POST", json={"csr": pem}, timeout=1)
        if reply.status != 200:
            raise CallError("ca", f"refused ({reply.status})")
        answer = reply.json()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert = self.write("cert.pem", answer["certificate"].encode())
        for context in (self.server, self.client):
            context.load_cert_chain(cert, self.write("key.pem", key_pem))
        self.expires = time.time() + answer["lifetime_s"]
        self.expiry_told = False
        self.renew_at = time.time() + answer["lifetime_s"] / 2  # renew at half-life


def setup(node: Node) -> None:
    domain = node.param("trust_domain", "sandbox.distlab")
    prefix = f"spiffe://{domain}/"
    identity = Identity(node, domain)
    mesh = {"policy": "enforce"}
    authz: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    said: dict[tuple[str, ...], float] = {}  # what the event log was told, and when

    def once_a_second(*key: str) -> bool:
        """Events about calls come at most once a second for each kind (and peer)."""
        now = time.monotonic()
        if now - said.get(key, 0.0) < 1.0:
            return False
        said[key] = now
        return True

    if node.name != "intruder":  # the intruder has no certificate: it cannot serve TLS
        node.serve_tls(identity.server)

    # ---- the calls it receives: who is calling, and may they? -------------------------

    def caller_of(request: Request) -> str | None:
        """The SPIFFE ID in the caller's certificate (None: it presented none)."""
        for kind, value in node.peer_certificate(request).get("subjectAltName", ()):
            if kind == "URI" and value.startswith(prefix):
                return str(value[len(prefix) :])
        return None

    def allowed(request: Request, route: str) -> bool:
        caller = caller_of(request) or "no identity"
        if caller in POLICY[route]:
            authz[caller]["allowed"] += 1
            return True
        authz[caller]["denied"] += 1
        action = "403" if mesh["policy"] == "enforce" else "logged only"
        if once_a_second("denied", caller, route):
            node.event("denied", caller=caller, route=route, action=action)
        return mesh["policy"] == "log only"

    def forbidden(route: str) -> Response:
        return node.json({"error": f"{route}: not allowed for this caller"}, status=403)

    # ---- the calls it makes: mutual TLS, a failure named for what it is ----------------

    async def call(peer: str, route: str, **kwargs: Any) -> Reply:
        method, path = route.split(" ")
        try:
            return await node.call(peer, path, method=method, tls=identity.client, **kwargs)
        except CallError as exc:
            if exc.reason == "tls" and once_a_second("tls", peer, exc.detail):
                node.event("handshake_refused", peer=peer, reason=exc.detail)
            raise

    async def forward(peer: str, route: str, body: Any) -> Response:
        try:
            reply = await call(peer, route, json=body, timeout=1.0)
        except CallError as exc:
            status = 504 if exc.reason == "timeout" else 502
            return node.json({"error": f"{peer}: {exc.reason} {exc.detail}".strip()}, status)
        return node.relay(reply)

    if node.name == "gateway":

        @node.route("/checkout", method="POST")
        async def checkout(request: Request) -> Response:
            if not allowed(request, "POST /checkout"):
                return forbidden("POST /checkout")
            return await forward("orders", "POST /orders", await request.json())

    if node.name == "orders":
        placed = {"count": 0}

        @node.route("/orders", method="POST")
        async def place(request: Request) -> Response:
            if not allowed(request, "POST /orders"):
                return forbidden("POST /orders")
            placed["count"] += 1
            return await forward("inventory", "POST /reserve", await request.json())

        @node.route("/orders")
        async def listing(request: Request) -> Response:
            if not allowed(request, "GET /orders"):
                return forbidden("GET /orders")
            return node.json({"orders": placed["count"]})

    if node.name == "inventory":

        @node.route("/reserve", method="POST")
        async def reserve(request: Request) -> Response:
            if not allowed(request, "POST /reserve"):
                return forbidden("POST /reserve")
            return node.json({"reserved": (await request.json()).get("item")})

    # ---- what it does by itself ------------------------------------------------------

    async def attempt(peer: str, route: str, body: Any = None) -> None:
        with contextlib.suppress(CallError):  # the call event (and handshake_refused) say why
            await call(peer, route, json=body, timeout=2.0)

    if node.name == "client":
        node.setting("rps", 10.0, minimum=0, maximum=100)

        @node.task
        async def shop() -> None:
            n = 0
            while True:
                rps = node.config["rps"]
                if rps <= 0 or not identity.expires:
                    await asyncio.sleep(0.2)
                    continue
                n += 1
                body = {"order": f"o-{n}", "item": f"k{n % 50}"}
                asyncio.get_running_loop().create_task(attempt("gateway", "POST /checkout", body))
                await asyncio.sleep(1 / rps)

    if node.name == "reporting":

        @node.task
        async def report() -> None:
            tick = 0
            while True:
                if identity.expires:
                    tick += 1
                    await attempt("orders", "GET /orders")
                    if tick % 3 == 0:  # not allowed: the policy will say so
                        await attempt("inventory", "POST /reserve", {"item": "k1"})
                await asyncio.sleep(1)

    if node.name == "intruder":
        node.setting("active", False)

        @node.task
        async def intrude() -> None:
            while True:
                if node.config["active"] and identity.root:
                    await attempt("orders", "POST /orders", {"order": "stolen", "item": "k1"})
                await asyncio.sleep(0.5)

    # ---- keeping the identity: trust bundle, mode and CRL each second; renewals ---------

    @node.task
    async def keep_identity() -> None:
        while True:
            try:
                bundle = (await node.call("ca", "/bundle", timeout=1.0)).json()
                identity.trust(bundle)
                mesh["policy"] = bundle["policy"]
                rotations = bundle["rotate"].get(node.name, 0)
                due = time.time() >= identity.renew_at or rotations != identity.rotations
                if node.name != "intruder" and due:
                    await identity.renew()
                    identity.rotations = rotations
            except (CallError, ValueError, KeyError):
                pass  # the CA is unreachable: keep what we have, try again in a second
            left = identity.expires - time.time()
            if identity.expires and left <= 0 and not identity.expiry_told:
                node.event("expired", reason="not renewed in time")
                identity.expiry_told = True
            if node.name != "intruder":
                node.gauge("cert_expires_in_s", round(max(left, 0)))
            if node.name in AUTHZ_TABLES:
                node.table(
                    AUTHZ_TABLES[node.name],
                    [
                        {"caller": c, "allowed": n["allowed"], "denied": n["denied"]}
                        for c, n in sorted(authz.items())
                    ],
                )
            await asyncio.sleep(1)
