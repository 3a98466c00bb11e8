from __future__ import annotations

from django.urls import path

from apps.lti import views

app_name = "lti"

urlpatterns = [
    path("", views.configuration, name="configuration"),
    path("platforms/<int:platform_id>/", views.configuration, name="platform"),
    path("login/", views.oidc_login, name="login"),
    path("launch/", views.launch, name="launch"),
    path("welcome/", views.welcome, name="welcome"),
    path("deep-link/", views.deep_link, name="deep_link"),
    path("jwks/", views.keyset, name="jwks"),
]
