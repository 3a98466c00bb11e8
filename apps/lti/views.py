"""LTI 1.3 endpoints: the platform's login initiation and launch (cross-site form posts,
so without Django's CSRF check: the signed id_token, the state cookie and the one-use
nonce protect them), a new user's choice of account, the instructor's chapter picker for
deep linking, the tool's public keys, and the admin's configuration page."""

from __future__ import annotations

from dataclasses import asdict
from urllib.parse import urlparse

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required, user_passes_test
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_POST, require_safe
from pylti1p3.contrib.django.launch_data_storage.cache import DjangoCacheDataStorage
from pylti1p3.contrib.django.message_launch import DjangoMessageLaunch
from pylti1p3.contrib.django.oidc_login import DjangoOIDCLogin
from pylti1p3.contrib.django.request import DjangoRequest
from pylti1p3.deep_link import DeepLink
from pylti1p3.deep_link_resource import DeepLinkResource
from pylti1p3.exception import LtiException, OIDCException
from pylti1p3.lineitem import LineItem

from apps.accounts.models import User
from apps.courses.models import Chapter
from apps.courses.selectors import chapter_list_live
from apps.lti import launches
from apps.lti.conf import (
    STATE_SECONDS,
    SessionService,
    ToolConf,
    jwks,
    platform_find,
    registration,
    tool_key,
)
from apps.lti.forms import PlatformForm
from apps.lti.launches import Launch, LaunchError
from apps.lti.models import Platform, ScoreLink
from apps.lti.scores import chapter_score
from config.security import POLICY

PARKED_COOKIE = "distlab_lti_launch"
DEEP_LINK_SESSION = "lti_deep_link"
BACKEND = "django.contrib.auth.backends.ModelBackend"

# What pylti1p3's refusals mean, in words a learner (or the school's admin) can act on.
REFUSALS = (
    (
        "State not found",
        "This launch did not start from a sign-in Distlab began, or it took "
        "longer than 10 minutes. Open the link again from your course.",
    ),
    (
        "Missing state",
        "This launch did not start from a sign-in Distlab began. Open the link "
        "again from your course.",
    ),
    (
        "Invalid Nonce",
        "This launch was already used (each one is good once) or it expired. "
        "Open the link again from your course.",
    ),
    ("nonce", "This launch carries no nonce, so it could be replayed: refused."),
    (
        "Signature has expired",
        "This launch has expired (its “exp” is past). Open the link "
        "again from your course; if it keeps happening, the LMS's clock is wrong.",
    ),
    (
        "Signature verification failed",
        "This launch is not signed by the LMS's published key: "
        "it was changed on the way or did not come from the LMS.",
    ),
    (
        "Unable to find public key",
        "This launch is signed with a key the LMS does not publish at its keyset URL.",
    ),
    (
        "Registration not found",
        "This launch is meant for another tool (its audience is not a "
        "client id registered here), or its LMS is not registered with this Distlab.",
    ),
    (
        "Could not find registration",
        "This LMS (issuer and client id) is not registered with "
        "this Distlab. The school's admin adds it at /lti/.",
    ),
    (
        "Client id not registered",
        "This launch is meant for another tool: its audience is not this Distlab's client id.",
    ),
    (
        "Unable to find deployment",
        "This deployment of the LMS is not registered with this "
        "Distlab. The school's admin adds its deployment id at /lti/.",
    ),
    ("Error during fetch", "Distlab could not fetch the LMS's public keys to check the launch."),
    (
        "cookie",
        "Your browser did not send back the cookie Distlab set when this launch began "
        "(it blocks them in frames or from other sites). Set the tool to open in a new window.",
    ),
)


def _refused(request: HttpRequest, why: str, status: int = 400) -> HttpResponse:
    return render(request, "lti/refused.html", {"why": why}, status=status)


def _refusal(exc: Exception) -> str:
    text = str(exc)
    for needle, meaning in REFUSALS:
        if needle in text:
            return meaning
    return f"The launch from the LMS was refused: {text}"


def _storage() -> DjangoCacheDataStorage:
    return DjangoCacheDataStorage()


@csrf_exempt
@require_http_methods(["GET", "POST"])
def oidc_login(request: HttpRequest) -> HttpResponse:
    """Step 1: the platform asks Distlab to sign in; Distlab sends the browser back to the
    platform's authentication URL with a fresh state (cookie) and nonce (cache)."""
    try:
        login_flow = DjangoOIDCLogin(
            request, ToolConf(), session_service=SessionService(DjangoRequest(request))
        )
        login_flow.set_launch_data_storage(_storage()).set_launch_data_lifetime(STATE_SECONDS)
        return login_flow.redirect(request.build_absolute_uri(reverse("lti:launch")))
    except (LtiException, OIDCException) as exc:
        return _refused(request, _refusal(exc))


@csrf_exempt
@require_POST
def launch(request: HttpRequest) -> HttpResponse:
    """Step 2: the platform posts the signed id_token. A known user is signed in and sent
    on; a new one chooses an account first."""
    try:
        message = DjangoMessageLaunch(
            request, ToolConf(), session_service=SessionService(DjangoRequest(request))
        )
        message.set_launch_data_storage(_storage()).set_launch_data_lifetime(STATE_SECONDS)
        message.validate()
        platform = platform_find(message.get_iss(), message.get_client_id())
        if platform is None:
            raise LtiException("Registration not found.")
        found = launches.launch_read(message, platform)
    except LaunchError as exc:
        return _refused(request, str(exc))
    except LtiException as exc:
        return _refused(request, _refusal(exc))
    user = launches.identity_user(found)
    if user is None:
        response = redirect("lti:welcome")
        response.set_cookie(
            PARKED_COOKIE,
            launches.launch_park(found),
            max_age=launches.PARKED_SECONDS,
            httponly=True,
            samesite="Lax",
            secure=request.is_secure(),
        )
        return response
    return _finish(request, found, user)


def _finish(request: HttpRequest, found: Launch, user: User) -> HttpResponse:
    login(request, user, backend=BACKEND)
    if found.deep_link:
        request.session[DEEP_LINK_SESSION] = asdict(found)
    return redirect(launches.launch_finish(found, user))


@require_http_methods(["GET", "POST"])
def welcome(request: HttpRequest) -> HttpResponse:
    """A platform user Distlab has not seen: a new account, or the one signed in here."""
    token = request.COOKIES.get(PARKED_COOKIE, "")
    found = launches.launch_parked(token)
    if found is None:
        return _refused(
            request,
            "This launch has expired or was already completed. Open the link again "
            "from your course.",
            status=410,
        )
    signed_in = request.user if request.user.is_authenticated else None
    if request.method == "POST":
        choice = request.POST.get("account")
        user = launches.identity_user(found)  # a second tab may have chosen already
        if user is None:
            if choice == "this" and isinstance(signed_in, User):
                launches.identity_link(found, signed_in)
                user = signed_in
            elif choice == "new":
                user = launches.account_create(found)
            else:
                return _refused(request, "Choose a new account or the one you are signed in to.")
        launches.launch_unpark(token)
        response = _finish(request, found, user)
        response.delete_cookie(PARKED_COOKIE)
        return response
    context = {
        "launch": found,
        "platform": found.platform,
        "signed_in": signed_in,
        "login_url": reverse("accounts:login") + "?next=" + reverse("lti:welcome"),
    }
    return render(request, "lti/welcome.html", context)


def _deep_link_launch(request: HttpRequest) -> Launch | None:
    data = request.session.get(DEEP_LINK_SESSION)
    return Launch(**data) if isinstance(data, dict) else None


@login_required
@require_http_methods(["GET", "POST"])
def deep_link(request: HttpRequest) -> HttpResponse:
    """The LMS's "add a tool link": an instructor picks chapters; Distlab answers the
    platform with a signed list of links, each a gradebook column."""
    found = _deep_link_launch(request)
    if found is None:
        return _refused(
            request,
            "Start from your course: add Distlab as an activity there, "
            "and it opens this page to pick a chapter.",
            status=404,
        )
    if not found.instructor:
        return _refused(request, "Only the course's instructors add chapters.", status=403)
    settings = found.deep_link_settings
    multiple = str(settings.get("accept_multiple", "true")).lower() != "false"
    chapters = chapter_list_live()
    if request.method == "GET":
        return render(
            request,
            "lti/deep_link.html",
            {"chapters": chapters, "multiple": multiple, "platform": found.platform},
        )
    chosen = [c for c in chapters if c.slug in request.POST.getlist("chapter")]
    if not chosen or (len(chosen) > 1 and not multiple):
        return render(
            request,
            "lti/deep_link.html",
            {
                "chapters": chapters,
                "multiple": multiple,
                "platform": found.platform,
                "error": "Pick one chapter." if not multiple else "Pick at least one chapter.",
            },
            status=400,
        )
    user_id = int(request.user.pk or 0)
    resources = [_resource(request, chapter, user_id) for chapter in chosen]
    link = DeepLink(registration(found.platform), found.deployment_id, settings)  # type: ignore[arg-type]
    token = link.get_response_jwt(resources)
    del request.session[DEEP_LINK_SESSION]
    return_url = str(settings.get("deep_link_return_url", ""))
    response = render(
        request,
        "lti/deep_link_return.html",
        {"return_url": return_url, "jwt": token, "chosen": chosen, "platform": found.platform},
    )
    target = urlparse(return_url)
    response.headers["Content-Security-Policy"] = POLICY.replace(
        "form-action 'self'", f"form-action 'self' {target.scheme}://{target.netloc}"
    )
    return response


def _resource(request: HttpRequest, chapter: Chapter, user_id: int) -> DeepLinkResource:
    maximum = chapter_score(user_id=user_id, chapter=chapter).maximum
    return (
        DeepLinkResource()
        .set_title(f"Distlab {chapter.number}. {chapter.title}")
        .set_url(request.build_absolute_uri(chapter.get_absolute_url()))
        .set_custom_params({"chapter": chapter.slug})
        .set_lineitem(
            LineItem()
            .set_label(f"Distlab {chapter.number}. {chapter.title}"[:100])
            .set_score_maximum(maximum)
            .set_resource_id(chapter.slug)
        )
    )


@require_safe
def keyset(request: HttpRequest) -> JsonResponse:
    """The tool's public keys (JWKS), which platforms use to check what Distlab signs."""
    tool_key()  # there is always one to publish
    return JsonResponse(jwks())


def _admin(user: object) -> bool:
    return bool(getattr(user, "is_superuser", False) or getattr(user, "is_staff", False))


@login_required
@user_passes_test(_admin)
@require_http_methods(["GET", "POST"])
def configuration(request: HttpRequest, platform_id: int | None = None) -> HttpResponse:
    """For the school's admin: the URLs to give the LMS, the registered platforms, and a
    form to add or change one."""
    platform = get_object_or_404(Platform, pk=platform_id) if platform_id else None
    form = PlatformForm(request.POST or None, instance=platform)
    if request.method == "POST" and form.is_valid():
        saved = form.save()
        messages.success(request, f"Saved {saved.name}.")
        return redirect("lti:configuration")
    key = tool_key()
    context = {
        "form": form,
        "editing": platform,
        "platforms": Platform.objects.all(),
        "key": key,
        "urls": {
            "login": request.build_absolute_uri(reverse("lti:login")),
            "launch": request.build_absolute_uri(reverse("lti:launch")),
            "deep_link": request.build_absolute_uri(reverse("lti:launch")),
            "jwks": request.build_absolute_uri(reverse("lti:jwks")),
            "domain": request.get_host(),
        },
        "refused": ScoreLink.objects.exclude(error="").select_related("user", "platform")[:20],
    }
    return render(request, "lti/configuration.html", context, status=400 if form.errors else 200)
