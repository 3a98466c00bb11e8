from __future__ import annotations

from django.urls import path

from apps.courses import views

app_name = "courses"

urlpatterns = [
    path("", views.home, name="home"),
    path("chapters/<slug:slug>/", views.chapter_detail, name="chapter"),
    path("chapters/<slug:slug>/progress/", views.chapter_progress, name="progress"),
    path("chapters/<slug:slug>/quiz/", views.quiz_submit, name="quiz"),
]
