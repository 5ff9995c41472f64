from __future__ import annotations

from django.urls import path

from tests.django_site import views

urlpatterns = [
    path("health/", views.health),
    path("query/", views.query),
    path("thread-leak/", views.thread_leak),
    path("idle-in-transaction/", views.idle_in_transaction),
    path("open-transaction/", views.open_transaction),
    path("async-query/", views.async_query),
    path("gc/", views.collect),
]
