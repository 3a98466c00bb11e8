"""pylti1p3's view of Distlab's LTI configuration: registrations and deployments from the
``Platform`` rows, the tool's keys from ``ToolKey``, and where launch state lives.

Every issuer may have several client ids (one per registration). Launch state (the
login's nonce and state) is kept in the cache for ``STATE_SECONDS``; a nonce is taken out
when a launch uses it, so the same signed launch cannot be posted twice.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.db import transaction
from pylti1p3.contrib.django.launch_data_storage.cache import DjangoCacheDataStorage
from pylti1p3.contrib.django.session import DjangoSessionService
from pylti1p3.deployment import Deployment
from pylti1p3.registration import Registration
from pylti1p3.tool_config import ToolConfAbstract

from apps.lti.models import Platform, ToolKey

STATE_SECONDS = 10 * 60  # from the login redirect to the launch


def tool_key() -> ToolKey:
    """The key Distlab signs with: the newest active one, made the first time it is needed."""
    key = ToolKey.objects.filter(active=True).first()
    if key is not None:
        return key
    with transaction.atomic():
        key = ToolKey.objects.select_for_update().filter(active=True).first()
        return key or tool_key_create()


def tool_key_create() -> ToolKey:
    """A new 2048-bit RSA key; it signs from now on, and the older ones stay published
    until they are deactivated. Its kid is its JWK thumbprint (RFC 7638), as pylti1p3
    names the key in what it signs."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return ToolKey.objects.create(
        kid=Registration.get_jwk(public)["kid"],
        private_key=private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        public_key=public,
    )


def jwks() -> dict[str, Any]:
    """Every active key's public half, as the platforms fetch it."""
    return {
        "keys": [Registration.get_jwk(k.public_key) for k in ToolKey.objects.filter(active=True)]
    }


def registration(platform: Platform) -> Registration:
    key = tool_key()
    return (
        Registration()
        .set_issuer(platform.issuer)
        .set_client_id(platform.client_id)
        .set_auth_login_url(platform.auth_login_url)
        .set_auth_token_url(platform.auth_token_url)
        .set_auth_audience(platform.auth_audience or None)  # type: ignore[arg-type]
        .set_key_set_url(platform.key_set_url)
        .set_tool_private_key(key.private_key)
        .set_tool_public_key(key.public_key)
    )


def platform_find(iss: str, client_id: str | None) -> Platform | None:
    """The active registration of ``iss`` for ``client_id``; without a client id (the
    login request may leave it out), the issuer's only one."""
    found = Platform.objects.filter(issuer=iss, active=True)
    if client_id:
        return found.filter(client_id=client_id).first()
    only = list(found[:2])
    return only[0] if len(only) == 1 else None


class ToolConf(ToolConfAbstract):
    def check_iss_has_one_client(self, iss: str) -> bool:
        return False

    def check_iss_has_many_clients(self, iss: str) -> bool:
        return True

    def find_registration_by_issuer(  # type: ignore[override]  # None: not registered here
        self, iss: str, *args: Any, **kwargs: Any
    ) -> Registration | None:
        return self.find_registration_by_params(iss, "")  # the issuer's only registration

    def find_registration_by_params(  # type: ignore[override]  # None: not registered here
        self, iss: str, client_id: str, *args: Any, **kwargs: Any
    ) -> Registration | None:
        platform = platform_find(iss, client_id)
        return registration(platform) if platform else None

    def find_deployment(self, iss: str, deployment_id: str) -> Deployment | None:
        return self.find_deployment_by_params(iss, deployment_id, "")

    def find_deployment_by_params(
        self, iss: str, deployment_id: str, client_id: str, *args: Any, **kwargs: Any
    ) -> Deployment | None:
        platform = platform_find(iss, client_id)
        if platform is None or deployment_id not in platform.deployments:
            return None
        return Deployment().set_deployment_id(deployment_id)


class SessionService(DjangoSessionService):
    """A nonce is good for one launch: checking it takes it out (atomically: the cache's
    delete says whether it was there)."""

    def check_nonce(self, nonce: str) -> bool:
        storage = self.data_storage
        assert isinstance(storage, DjangoCacheDataStorage)
        return bool(
            storage._get_cache().delete(storage._prepare_key(self._get_key("nonce", nonce)))
        )
