from __future__ import annotations

from django.urls import path

from apps.labs import views

app_name = "labs"

urlpatterns = [
    path("launch/<slug:pattern>/", views.sandbox_launch, name="launch"),
    path("<str:sandbox_id>/", views.sandbox_detail, name="sandbox"),
    path("<str:sandbox_id>/stop/", views.sandbox_stop, name="stop"),
    path("<str:sandbox_id>/extend/", views.sandbox_extend, name="extend"),
]
