"""Every workload of the shop (chapter 10); the node's name says which part it plays:

- ``client`` sends checkouts to ``gateway`` (``POST /checkout``) at ``rps``,
- ``gateway`` passes each one to ``orders`` (``POST /orders``),
- ``orders`` reserves stock in ``inventory`` (``POST /reserve``) and lists its orders
  (``GET /orders``),
- ``reporting`` reads ``GET /orders`` every second, and tries ``POST /reserve`` on
  ``inventory`` every few seconds: the policy does not allow it,
- ``intruder`` has no certificate; switched on, it calls ``POST /orders`` twice a second,
- ``auditor`` acts for a user who may read orders but not place them; switched on, it
  sends a checkout twice a second: a forbidden call, which some hop must refuse.

Zero trust, at every hop: each workload has its own key and a short-lived certificate for
its SPIFFE ID from ``ca``, renewed at half its lifetime; every call between workloads is
mutual TLS (the standard library's ``ssl``: a fresh handshake per call, the peer's
certificate checked against the CA, its expiry and the CA's revocation list); and the
service that owns a route checks the caller's identity against ``POLICY`` before serving.

And the user's authority, at every hop: each call carries a token from ``ca`` (a JSON Web
Token) naming the user it is made for and their scopes. Each service checks its signature,
audience and dates (by its own clock) and the scope its route needs (``SCOPES``), then
passes the same token on, so the next hop checks the same user again. A service set as
the *deputy* skips that check and calls on with its own token: the confused deputy, who
lends its own authority to whoever asked.

``orders`` keeps the orders it placed encrypted at rest (``Vault``: envelope encryption
with a key-encryption key that is rotated, old versions destroyed once nothing needs them).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import ssl
import tempfile
import time
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandboxes.runtime.node import CallError, Node, Reply, Request, Response

# Deny by default: which identities may call each route of each service.
POLICY = {
    "POST /checkout": ["client", "auditor"],  # served by gateway
    "POST /orders": ["gateway"],  # served by orders
    "GET /orders": ["reporting"],  # served by orders
    "POST /reserve": ["orders"],  # served by inventory
}

# What the user's token must allow for each route (its ``scope`` claim).
SCOPES = {
    "POST /checkout": "checkout",
    "POST /orders": "orders:write",
    "GET /orders": "orders:read",
    "POST /reserve": "inventory:reserve",
}
AUDIENCE = "shop"  # the API every token must be meant for
ECDSA = ec.ECDSA(hashes.SHA256())

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


class TokenRefused(Exception):
    """A token that does not allow the call; the message says why, ``status`` is the
    answer (401: no valid token, 403: a valid one without the scope) and ``user`` whom a
    valid token names."""

    def __init__(self, reason: str, status: int = 401, user: str = "?") -> None:
        super().__init__(reason)
        self.status, self.user = status, user


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify(token: str, key: Any, now: float, leeway: float) -> dict[str, Any]:
    """The claims of a valid token, or TokenRefused. The algorithm is fixed (ES256): a
    token that names another one, ``none`` included, is refused before anything else.
    ``now`` is this node's clock, ``leeway`` how far apart clocks may be."""
    try:
        header, payload, signature = token.split(".")
        if json.loads(unb64(header)).get("alg") != "ES256":
            raise TokenRefused("its algorithm is not ES256")
        raw = unb64(signature)
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        key.verify(encode_dss_signature(r, s), f"{header}.{payload}".encode(), ECDSA)
        claims: dict[str, Any] = json.loads(unb64(payload))
        issued_at, expires = float(claims["iat"]), float(claims["exp"])
    except InvalidSignature:
        raise TokenRefused("bad signature") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TokenRefused("malformed") from None
    if claims.get("aud") != AUDIENCE:
        raise TokenRefused(f"meant for {claims.get('aud')}, not {AUDIENCE}")
    if now > expires + leeway:
        raise TokenRefused(f"expired {now - expires:.0f} s ago by this node's clock")
    if issued_at > now + leeway:
        raise TokenRefused(f"issued {issued_at - now:.0f} s ahead of this node's clock")
    return claims


class Vault:
    """Orders at rest, with envelope encryption: each order is encrypted (AES-GCM) with a
    data key of its own, kept only wrapped (encrypted) by a key-encryption key (KEK). KEKs
    have versions: rotating adds a primary version for new orders; an old version is kept
    to unwrap what it wrapped until the re-wrapper has moved those data keys to the primary
    (the orders themselves are not re-encrypted), and is then destroyed. A KMS would hold
    the KEKs; here ``orders`` does."""

    KEEP = 1000  # the newest orders kept (retention): older ones are deleted

    def __init__(self) -> None:
        self.keks = {1: AESGCM.generate_key(bit_length=128)}
        self.primary = 1
        self.records: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def wrap(self, data_key: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self.keks[self.primary]).encrypt(nonce, data_key, None)

    def unwrap(self, record: dict[str, Any]) -> bytes:
        wrapped = record["wrapped"]
        return AESGCM(self.keks[record["kek"]]).decrypt(wrapped[:12], wrapped[12:], None)

    def put(self, order_id: str, order: dict[str, Any]) -> None:
        data_key, nonce = AESGCM.generate_key(bit_length=128), os.urandom(12)
        sealed = AESGCM(data_key).encrypt(nonce, json.dumps(order).encode(), order_id.encode())
        self.records[order_id] = {
            "kek": self.primary,
            "wrapped": self.wrap(data_key),
            "nonce": nonce,
            "sealed": sealed,
        }
        while len(self.records) > self.KEEP:
            self.records.popitem(last=False)

    def get(self, order_id: str) -> dict[str, Any]:
        record = self.records[order_id]
        data_key = AESGCM(self.unwrap(record))
        order: dict[str, Any] = json.loads(
            data_key.decrypt(record["nonce"], record["sealed"], order_id.encode())
        )
        return order

    def rotate(self) -> int:
        self.primary = max(self.keks) + 1
        self.keks[self.primary] = AESGCM.generate_key(bit_length=128)
        return self.primary

    def rewrap(self, limit: int) -> None:
        """Move up to ``limit`` data keys from old KEK versions to the primary one."""
        for record in [r for r in self.records.values() if r["kek"] != self.primary][:limit]:
            record["wrapped"], record["kek"] = self.wrap(self.unwrap(record)), self.primary

    def in_use(self) -> collections.Counter[int]:
        return collections.Counter(r["kek"] for r in self.records.values())

    def destroy_unused(self) -> list[int]:
        """Destroy every old KEK that wraps nothing any more; their versions."""
        used = self.in_use()
        gone = [v for v in self.keks if v != self.primary and not used[v]]
        for version in gone:
            del self.keks[version]
        return gone


def setup(node: Node) -> None:
    domain = node.param("trust_domain", "sandbox.distlab")
    leeway = float(node.param("clock_leeway_s", 10))  # clocks differ a little anyway
    prefix = f"spiffe://{domain}/"
    identity = Identity(node, domain)
    mesh: dict[str, Any] = {"policy": "enforce", "deputy": "none", "skew": {}, "key": None}
    held = {"token": "", "audience": "", "renew_at": 0.0}  # this node's own token
    authz: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    said: dict[tuple[str, ...], float] = {}  # what the event log was told, and when

    def once_a_second(*key: str) -> bool:
        """Events about calls come at most once a second for each kind (and peer)."""
        now = time.monotonic()
        if now - said.get(key, 0.0) < 1.0:
            return False
        said[key] = now
        return True

    def clock() -> float:
        """This node's clock: the real time, unless the learner skewed it."""
        return time.time() + float(mesh["skew"].get(node.name, 0))

    if node.name != "intruder":  # the intruder has no certificate: it cannot serve TLS
        node.serve_tls(identity.server)

    # ---- the calls it receives: who is calling, for whom, and may they? ---------------

    def caller_of(request: Request) -> str | None:
        """The SPIFFE ID in the caller's certificate (None: it presented none)."""
        for kind, value in node.peer_certificate(request).get("subjectAltName", ()):
            if kind == "URI" and value.startswith(prefix):
                return str(value[len(prefix) :])
        return None

    def user_of(request: Request, route: str) -> str:
        """Whom the call is made for, from its token, if the token allows ``route``;
        TokenRefused otherwise."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not token:
            raise TokenRefused("no token")
        if mesh["key"] is None:
            raise TokenRefused("no key from the CA yet to check it with")
        claims = verify(token, mesh["key"], clock(), leeway)
        user = str(claims.get("sub"))
        if SCOPES[route] not in str(claims.get("scope", "")).split():
            raise TokenRefused(f"{user} lacks the scope {SCOPES[route]}", 403, user)
        return user

    def authorize(request: Request, route: str) -> tuple[Response | None, str]:
        """Check the caller (its certificate's identity against ``POLICY``), then the user
        (the token against ``SCOPES``). Returns the refusal to answer with (None: serve)
        and the token to call on with: the same one, or ours if we are the deputy."""
        caller = caller_of(request) or "no identity"
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        enforce = mesh["policy"] == "enforce"
        action = "403" if enforce else "logged only"
        refusal: tuple[int, str] | None = None
        if caller not in POLICY[route]:
            refusal = (403, f"{route}: not allowed for this caller")
            if once_a_second("denied", caller, route):
                node.event("denied", caller=caller, route=route, action=action)
            user = "n/a"
        elif mesh["deputy"] == node.name:  # the confused deputy: no user, our own authority
            user, token = "not checked", held["token"]
        else:
            try:
                user = user_of(request, route)
            except TokenRefused as exc:
                user, refusal = exc.user, (exc.status, f"token refused: {exc}")
                if once_a_second("token", caller, route, str(exc)):
                    action = str(exc.status) if enforce else "logged only"
                    node.event("token_refused", route=route, reason=str(exc), action=action)
        authz[(caller, user)]["denied" if refusal else "allowed"] += 1
        if refusal and enforce:
            return node.json({"error": refusal[1]}, status=refusal[0]), token
        return None, token

    # ---- the calls it makes: mutual TLS and a token, a failure named for what it is ----

    async def call(peer: str, route: str, token: str, **kwargs: Any) -> Reply:
        method, path = route.split(" ")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            reply = await node.call(
                peer, path, method=method, tls=identity.client, headers=headers, **kwargs
            )
        except CallError as exc:
            if exc.reason == "tls" and once_a_second("tls", peer, exc.detail):
                node.event("handshake_refused", peer=peer, reason=exc.detail)
            raise
        if reply.status == 401 and token and token == held["token"]:
            held["renew_at"] = 0.0  # our token was refused: ask the CA for a fresh one
        return reply

    async def forward(peer: str, route: str, token: str, body: Any) -> Response:
        try:
            reply = await call(peer, route, token, json=body, timeout=1.0)
        except CallError as exc:
            status = 504 if exc.reason == "timeout" else 502
            return node.json({"error": f"{peer}: {exc.reason} {exc.detail}".strip()}, status)
        return node.relay(reply)

    if node.name == "gateway":

        @node.route("/checkout", method="POST")
        async def checkout(request: Request) -> Response:
            refused, token = authorize(request, "POST /checkout")
            if refused is not None:  # (an empty aiohttp response is falsy)
                return refused
            return await forward("orders", "POST /orders", token, await request.json())

    if node.name == "orders":
        vault = Vault()
        node.setting("key_rotation_s", 60, minimum=0, maximum=3600)
        node.setting("rewrap_per_s", 20, minimum=0, maximum=1000)

        @node.route("/orders", method="POST")
        async def place(request: Request) -> Response:
            refused, token = authorize(request, "POST /orders")
            if refused is not None:
                return refused
            order = await request.json()
            answer = await forward("inventory", "POST /reserve", token, order)
            if answer.status == 200:
                vault.put(str(order.get("order")), order)
            return answer

        @node.route("/orders")
        async def listing(request: Request) -> Response:
            refused, _ = authorize(request, "GET /orders")
            if refused is not None:
                return refused
            newest = next(reversed(vault.records), None)  # read back: decrypted on demand
            return node.json({"orders": len(vault.records), "newest": newest and vault.get(newest)})

        @node.task
        async def keys() -> None:
            rotated = time.monotonic()
            while True:
                period = node.config["key_rotation_s"]
                if period and time.monotonic() - rotated >= period:
                    node.event("key_rotated", version=vault.rotate())
                    rotated = time.monotonic()
                vault.rewrap(int(node.config["rewrap_per_s"]))
                for version in vault.destroy_unused():
                    node.event("key_destroyed", version=version)
                used = vault.in_use()
                node.table(
                    "keys",
                    [
                        {
                            "version": f"v{v}",
                            "state": "primary" if v == vault.primary else "old",
                            "orders": used[v],
                        }
                        for v in sorted(vault.keks, reverse=True)
                    ],
                )
                node.gauge("orders_on_old_keys", sum(used.values()) - used[vault.primary])
                await asyncio.sleep(1)

    if node.name == "inventory":

        @node.route("/reserve", method="POST")
        async def reserve(request: Request) -> Response:
            refused, _ = authorize(request, "POST /reserve")
            if refused is not None:
                return refused
            return node.json({"reserved": (await request.json()).get("item")})

    # ---- what it does by itself ------------------------------------------------------

    async def attempt(peer: str, route: str, body: Any = None) -> None:
        with contextlib.suppress(CallError):  # the call event (and handshake_refused) say why
            await call(peer, route, held["token"], json=body, timeout=2.0)

    def ready() -> bool:
        return bool(identity.expires and held["token"])

    if node.name == "client":
        node.setting("rps", 10.0, minimum=0, maximum=100)
        node.setting("audience", AUDIENCE, choices=[AUDIENCE, "billing"])

        @node.task
        async def shop() -> None:
            n = 0
            while True:
                rps = node.config["rps"]
                if rps <= 0 or not ready():
                    await asyncio.sleep(0.2)
                    continue
                n += 1
                body = {"order": f"o-{n}", "item": f"k{n % 50}"}
                asyncio.get_running_loop().create_task(attempt("gateway", "POST /checkout", body))
                await asyncio.sleep(1 / rps)

    if node.name == "auditor":
        node.setting("active", False)

        @node.task
        async def audit() -> None:
            n = 0
            while True:
                if node.config["active"] and ready():
                    n += 1
                    await attempt("gateway", "POST /checkout", {"order": f"a-{n}", "item": "k7"})
                await asyncio.sleep(0.5)

    if node.name == "reporting":

        @node.task
        async def report() -> None:
            tick = 0
            while True:
                if ready():
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

    # ---- keeping the identity: bundle, modes and CRL each second; renewals; a token -----

    def token_wanted() -> str | None:
        """The audience of the token to ask the CA for with the bundle: at half its
        lifetime, when the audience changes, or after ours was refused (None: none due)."""
        if node.name not in ("client", "auditor", "gateway", "orders", "reporting"):
            return None
        audience = node.config["audience"] if node.name == "client" else AUDIENCE
        due = time.time() >= held["renew_at"] or audience != held["audience"]
        return audience if due else None

    @node.task
    async def keep_identity() -> None:
        while True:
            try:
                audience = token_wanted()
                params = {"token": audience} if audience else None
                bundle = (await node.call("ca", "/bundle", params=params, timeout=1.0)).json()
                identity.trust(bundle)
                if audience and "token" in bundle:
                    held.update(token=bundle["token"], audience=audience)
                    held["renew_at"] = time.time() + bundle["token_lifetime_s"] / 2
                if bundle["deputy"] == node.name != mesh["deputy"]:
                    node.event("deputy")
                mesh.update(policy=bundle["policy"], deputy=bundle["deputy"], skew=bundle["skew"])
                if mesh.get("key_pem") != bundle["token_key"]:
                    mesh["key_pem"] = bundle["token_key"]
                    mesh["key"] = serialization.load_pem_public_key(bundle["token_key"].encode())
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
                        {"caller": c, "user": u, "allowed": n["allowed"], "denied": n["denied"]}
                        for (c, u), n in sorted(authz.items())
                    ],
                )
            await asyncio.sleep(1)
