from __future__ import annotations

from django.urls import path

from apps.labs import experiment_views, inspect_views, views

app_name = "labs"

urlpatterns = [
    path("launch/<slug:pattern>/", views.sandbox_launch, name="launch"),
    path("patterns/<slug:pattern>/code/<str:program>/", views.program_source, name="program"),
    path("<str:sandbox_id>/", views.sandbox_detail, name="sandbox"),
    path("<str:sandbox_id>/stop/", views.sandbox_stop, name="stop"),
    path("<str:sandbox_id>/extend/", views.sandbox_extend, name="extend"),
    path("<str:sandbox_id>/faults/", views.sandbox_faults, name="faults"),
    path(
        "<str:sandbox_id>/faults/<int:fault_id>/revert/",
        views.sandbox_fault_revert,
        name="fault_revert",
    ),
    path("<str:sandbox_id>/controls/", views.sandbox_controls, name="controls"),
]

# Experiments (apps/labs/experiment_views.py): a fragment the sandbox panel loads.
urlpatterns += [
    path("<str:sandbox_id>/experiments/", experiment_views.experiment_list, name="experiments"),
    path(
        "<str:sandbox_id>/experiments/cancel/",
        experiment_views.experiment_cancel,
        name="experiment_cancel",
    ),
    path(
        "<str:sandbox_id>/experiments/<slug:experiment_id>/start/",
        experiment_views.experiment_start,
        name="experiment_start",
    ),
]

# Traces and the central log, for patterns with a collector (apps/labs/inspect_views.py).
urlpatterns += [
    path("<str:sandbox_id>/traces/", inspect_views.sandbox_traces, name="traces"),
    path("<str:sandbox_id>/traces/<str:trace_id>/", inspect_views.sandbox_trace, name="trace"),
    path("<str:sandbox_id>/logs/", inspect_views.sandbox_logs, name="logs"),
]
