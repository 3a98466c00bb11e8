"""A test-side LTI 1.3 platform, as LTI's certification suite plays one: its own RSA key
and keyset URL, an OAuth 2 token endpoint that checks the tool's signed client assertion
against the tool's published keys, and a line item that records the scores posted to it.
It listens on loopback (a port of its own); launches are signed here and posted to
Distlab through Django's test client, as a browser would carry them."""

from __future__ import annotations

import html
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.test import Client
from pylti1p3.registration import Registration

from apps.lti.models import Platform

CLAIM = "https://purl.imsglobal.org/spec/lti/claim/"
AGS = "https://purl.imsglobal.org/spec/lti-ags/claim/endpoint"
DEEP_LINK = "https://purl.imsglobal.org/spec/lti-dl/claim/deep_linking_settings"
SCORE = "https://purl.imsglobal.org/spec/lti-ags/scope/score"
INSTRUCTOR = "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor"
LEARNER = "http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"


def rsa_key() -> tuple[str, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    )


@dataclass
class Lms:
    base: str
    client_id: str = "distlab-tool"
    deployment_id: str = "deployment-1"
    kid: str = "platform-key-1"
    private_key: str = ""
    public_key: str = ""
    tool_jwks: dict[str, Any] = field(default_factory=dict)  # what Distlab publishes
    tokens: set[str] = field(default_factory=set)
    scores: list[dict[str, Any]] = field(default_factory=list)  # posted to the line item
    refusals: list[str] = field(default_factory=list)  # why a token request was refused
    fail_scores: bool = False
    tool: str = "http://testserver"  # Distlab's base URL, for the pages a browser opens
    deep_links: list[str] = field(default_factory=list)  # answers posted back to the LMS

    @property
    def issuer(self) -> str:
        return self.base

    @property
    def lineitem(self) -> str:
        return f"{self.base}/courses/7/lineitems/1/lineitem"

    def register(self) -> Platform:
        return Platform.objects.create(
            name="Test LMS",
            issuer=self.issuer,
            client_id=self.client_id,
            deployment_ids=self.deployment_id,
            auth_login_url=f"{self.base}/auth",
            auth_token_url=f"{self.base}/token",
            key_set_url=f"{self.base}/jwks",
        )

    # --- signing launches -------------------------------------------------------------

    def id_token(
        self,
        nonce: str,
        *,
        sub: str = "lms-user-1",
        roles: tuple[str, ...] = (LEARNER,),
        message_type: str = "LtiResourceLinkRequest",
        custom: dict[str, str] | None = None,
        target: str = "http://testserver/chapters/replicated-load-balanced-services/",
        key: str | None = None,
        **overrides: Any,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.client_id,
            "sub": sub,
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            "name": "Alex Doe",
            "given_name": "Alex",
            "family_name": "Doe",
            "email": "alex@school.invalid",
            CLAIM + "message_type": message_type,
            CLAIM + "version": "1.3.0",
            CLAIM + "deployment_id": self.deployment_id,
            CLAIM + "roles": list(roles),
            CLAIM + "context": {"id": "course-7", "title": "Distributed Systems 101"},
            CLAIM + "target_link_uri": target,
        }
        if message_type == "LtiResourceLinkRequest":
            claims[CLAIM + "resource_link"] = {"id": "link-1", "title": "Chapter 5"}
            claims[AGS] = {"scope": [SCORE], "lineitem": self.lineitem}
        else:
            claims[DEEP_LINK] = {
                "deep_link_return_url": f"{self.base}/deep-link-return",
                "accept_types": ["ltiResourceLink"],
                "accept_presentation_document_targets": ["window"],
                "accept_multiple": True,
                "data": "opaque-platform-data",
            }
        if custom is not None:
            claims[CLAIM + "custom"] = custom
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(
            claims, key or self.private_key, algorithm="RS256", headers={"kid": self.kid}
        )

    def login(
        self, client: Client, *, client_id: str | None = None, secure: bool = False
    ) -> tuple[str, str]:
        """Step 1 as the platform starts it; returns the state and nonce Distlab sent."""
        scheme = "https" if secure else "http"
        response = client.post(
            "/lti/login/",
            {
                "iss": self.issuer,
                "login_hint": "hint-1",
                "target_link_uri": "http://testserver/lti/launch/",
                "client_id": client_id or self.client_id,
                "lti_message_hint": "message-hint-1",
            },
            secure=secure,
        )
        assert response.status_code == 302, response.content
        sent = urlparse(response["Location"])
        assert f"{sent.scheme}://{sent.netloc}{sent.path}" == f"{self.base}/auth"
        query = {k: v[0] for k, v in parse_qs(sent.query).items()}
        assert query["redirect_uri"] == f"{scheme}://testserver/lti/launch/"
        assert query["client_id"] == self.client_id
        return query["state"], query["nonce"]

    def launch(self, client: Client, *, secure: bool = False, **claims: Any) -> Any:
        """Login, then the platform's form post of a signed id_token (``claims`` change it)."""
        state, nonce = self.login(client, secure=secure)
        token = self.id_token(claims.pop("nonce", nonce), **claims)
        return client.post("/lti/launch/", {"id_token": token, "state": state}, secure=secure)

    # --- pages a real browser goes through ----------------------------------------------

    def course_page(self, query: dict[str, str]) -> str:
        """A course page with the platform's "open the tool" button: the third-party
        initiated login, posted to Distlab. Who launches travels in the login hint."""
        hint = "|".join(
            query.get(k, d)
            for k, d in (
                ("sub", "lms-user-1"),
                ("role", "learner"),
                ("kind", "link"),
                ("chapter", ""),
                ("tamper", ""),
            )
        )
        fields = {
            "iss": self.issuer,
            "login_hint": hint,
            "target_link_uri": f"{self.tool}/lti/launch/",
            "client_id": self.client_id,
            "lti_message_hint": "message-hint-1",
        }
        inputs = "".join(
            f'<input type="hidden" name="{k}" value="{html.escape(v)}">' for k, v in fields.items()
        )
        return (
            "<!doctype html><title>Distributed Systems 101</title><h1>Distributed Systems 101</h1>"
            f'<form method="post" action="{self.tool}/lti/login/">{inputs}'
            "<button>Open Distlab</button></form>"
        )

    def auth_page(self, query: dict[str, str]) -> str:
        """The platform's OIDC authorization: it signs the launch for the hinted user and
        posts it to the redirect URI, as LMSs do, with an auto-submitting form."""
        sub, role, kind, chapter, tamper = (query["login_hint"].split("|") + [""] * 5)[:5]
        custom = {"chapter": chapter} if chapter else None
        token = self.id_token(
            query["nonce"],
            sub=sub,
            roles=(INSTRUCTOR,) if role == "instructor" else (LEARNER,),
            message_type="LtiDeepLinkingRequest" if kind == "deep" else "LtiResourceLinkRequest",
            custom=custom,
            key=rsa_key()[0] if tamper else None,
        )
        return (
            "<!doctype html><title>Signing you in</title>"
            f'<form method="post" action="{html.escape(query["redirect_uri"])}">'
            f'<input type="hidden" name="id_token" value="{token}">'
            f'<input type="hidden" name="state" value="{html.escape(query["state"])}"></form>'
            "<script>document.forms[0].submit()</script>"
        )

    # --- the platform's endpoints -------------------------------------------------------

    def jwk(self) -> dict[str, Any]:
        key = dict(Registration.get_jwk(self.public_key))
        key["kid"] = self.kid
        return key

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """OAuth 2 client credentials with a JWT client assertion (RFC 7523)."""
        assertion = form.get("client_assertion", "")
        try:
            kid = jwt.get_unverified_header(assertion).get("kid")
            keys = [k for k in self.tool_jwks.get("keys", []) if k.get("kid") == kid]
            if not keys:
                raise jwt.InvalidTokenError(f"no published tool key {kid!r}")
            claims = jwt.decode(
                assertion,
                jwt.PyJWK(keys[0]).key,
                algorithms=["RS256"],
                audience=f"{self.base}/token",
            )
            if claims.get("iss") != self.client_id or claims.get("sub") != self.client_id:
                raise jwt.InvalidTokenError("iss/sub is not the client id")
        except jwt.PyJWTError as exc:
            self.refusals.append(str(exc))
            return 401, {"error": "invalid_client"}
        if form.get("grant_type") != "client_credentials" or SCORE not in form.get("scope", ""):
            self.refusals.append("grant or scope")
            return 400, {"error": "invalid_request"}
        access = secrets.token_urlsafe(16)
        self.tokens.add(access)
        return 200, {"access_token": access, "token_type": "Bearer", "expires_in": 3600}


@contextmanager
def serve_lms(host: str = "127.0.0.1") -> Iterator[Lms]:
    """The platform on a free loopback port; ``host`` is the name pages use for it (the
    browser test names it as the live server is named, so both are one site)."""
    private, public = rsa_key()
    holder: dict[str, Lms] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _page(self, body: str) -> None:
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/jwks":
                self._answer(200, {"keys": [holder["p"].jwk()]})
            elif url.path == "/course":
                self._page(holder["p"].course_page(query))
            elif url.path == "/auth":
                self._page(holder["p"].auth_page(query))
            else:
                self._answer(404, {})

        def do_POST(self) -> None:
            lms = holder["p"]
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            if self.path == "/token":
                form = {k: v[0] for k, v in parse_qs(body).items()}
                self._answer(*lms.token(form))
            elif self.path == "/deep-link-return":
                lms.deep_links.append(parse_qs(body)["JWT"][0])
                self._page("<!doctype html><title>Added</title><h1>Added to your course</h1>")
            elif self.path == urlparse(lms.lineitem).path + "/scores":
                bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if bearer not in lms.tokens:
                    self._answer(401, {})
                elif self.headers.get("Content-Type") != "application/vnd.ims.lis.v1.score+json":
                    self._answer(415, {})
                elif lms.fail_scores:
                    self._answer(503, {})
                else:
                    lms.scores.append(json.loads(body))
                    self._answer(200, {})
            else:
                self._answer(404, {})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    holder["p"] = Lms(
        base=f"http://{host}:{server.server_address[1]}", private_key=private, public_key=public
    )
    try:
        yield holder["p"]
    finally:
        server.shutdown()
        server.server_close()
