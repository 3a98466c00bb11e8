from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods

from apps.accounts import throttle
from apps.accounts.forms import InvitedSignupForm, SignupForm
from apps.accounts.http import HttpRequest

SIGNUP_CLOSED = (
    "Sign-up is closed on this server. Ask your instructor or the school's administrator "
    "for an account."
)
TOO_MANY_SIGNUPS = (
    "Too many accounts were created from your address in the last hour. Try again later, "
    "or ask your instructor for this server's invitation code."
)
TOO_MANY_RESETS = "Too many password resets were asked for from here. Try again in an hour."


@require_http_methods(["GET", "HEAD", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    """Open sign-up is limited per address; with ``SIGNUP=invite`` the server's code is
    asked for instead; ``SIGNUP=closed`` turns sign-up off."""
    if request.user.is_authenticated:
        return redirect("courses:home")
    if settings.SIGNUP == "closed":
        return render(request, "accounts/signup.html", {"closed": SIGNUP_CLOSED}, status=403)
    invited = settings.SIGNUP == "invite"
    form = (InvitedSignupForm if invited else SignupForm)(request.POST or None)
    address, limit = throttle.client_address(request), throttle.signups()
    if request.method == "POST" and not invited and limit.exceeded(address):
        context = {"form": form, "refused": TOO_MANY_SIGNUPS}
        return render(request, "accounts/signup.html", context, status=429)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        if not invited:  # the code is the gate for invited sign-ups (a class behind one NAT)
            limit.hit(address)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect(_next_or_home(request))
    status = 400 if form.errors else 200
    context = {"form": form, "next": _next_or_home(request, default="")}
    return render(request, "accounts/signup.html", context, status=status)


def _next_or_home(request: HttpRequest, default: str = "/") -> str:
    """Where to go after signing up: the page that sent the visitor here (a class's join
    link, say), if it is on this site; else ``default``."""
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return default


class LoginView(auth_views.LoginView):
    """Django's sign-in, plus a limit on failed sign-ins per address, whatever the
    usernames (Axes locks one username at one address; a password sprayed over many
    usernames is stopped here)."""

    template_name = "accounts/login.html"
    redirect_authenticated_user = True

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:  # type: ignore[override]
        if throttle.login_failures().exceeded(throttle.client_address(request)):
            context = {"cooloff_time": settings.AXES_COOLOFF_TIME, "by_address": True}
            return render(request, "accounts/locked_out.html", context, status=429)
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form: Any) -> HttpResponse:
        if self.request.method == "POST":
            throttle.login_failures().hit(throttle.client_address(self.request))
        return super().form_invalid(form)


class PasswordResetView(auth_views.PasswordResetView):
    """Django's reset by email (which never says whether an address has an account),
    limited per address and per email address, so that it can send no flood of mail."""

    template_name = "accounts/password_reset.html"
    email_template_name = "accounts/password_reset_email.txt"
    subject_template_name = "accounts/password_reset_subject.txt"

    def form_valid(self, form: Any) -> HttpResponse:
        limit = throttle.password_resets()
        keys = [throttle.client_address(self.request), form.cleaned_data["email"].lower()]
        if any(limit.exceeded(key) for key in keys):
            form.add_error(None, TOO_MANY_RESETS)
            return self.render_to_response(self.get_context_data(form=form), status=429)
        for key in keys:
            limit.hit(key)
        return super().form_valid(form)
