from __future__ import annotations

from django.urls import path

from apps.classrooms import views

app_name = "classrooms"

urlpatterns = [
    path("", views.classroom_list, name="list"),
    path("new/", views.classroom_create, name="create"),
    path("join/", views.join, name="join"),
    path("join/<str:code>/", views.join_link, name="join_link"),
    path("<int:classroom_id>/", views.dashboard, name="dashboard"),
    path("<int:classroom_id>/export.csv", views.export_csv, name="export"),
    path("<int:classroom_id>/insight/", views.insight, name="insight"),
    path("<int:classroom_id>/drills/", views.drills, name="drills"),
    path("<int:classroom_id>/wall/", views.wall, name="wall"),
    path("<int:classroom_id>/experiments/", views.class_experiments, name="class_experiments"),
    path(
        "<int:classroom_id>/experiments/<int:ask_id>/",
        views.class_experiment,
        name="class_experiment",
    ),
    path(
        "<int:classroom_id>/experiments/<int:ask_id>/close/",
        views.class_experiment_end,
        name="class_experiment_close",
    ),
    path("<int:classroom_id>/learners/<int:learner_id>/", views.learner_detail, name="learner"),
    path("<int:classroom_id>/manage/", views.manage, name="manage"),
    path("<int:classroom_id>/manage/<slug:action>/", views.manage_action, name="manage_action"),
    path("<int:classroom_id>/leave/", views.leave, name="leave"),
    path("<int:classroom_id>/consent/", views.consent, name="consent"),
]
