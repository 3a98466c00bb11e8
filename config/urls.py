from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("apps.courses.urls")),
    path("accounts/", include("apps.accounts.urls")),
    path("sandboxes/", include("apps.labs.urls")),
    path("admin/", admin.site.urls),
]

handler404 = "config.views.not_found"
handler500 = "config.views.server_error"
handler403 = "config.views.forbidden"
