from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from config import views

urlpatterns = [
    path("", include("apps.courses.urls")),
    path("accounts/", include("apps.accounts.urls")),
    path("sandboxes/", include("apps.labs.urls")),
    path("classrooms/", include("apps.classrooms.urls")),
    path("lti/", include("apps.lti.urls")),
    path("admin/", admin.site.urls),
    path("readyz", views.readyz, name="readyz"),
]

handler404 = "config.views.not_found"
handler500 = "config.views.server_error"
handler403 = "config.views.forbidden"
