"""A Celery-style worker: a long-lived process that runs tasks which query the database.

``python -m django fake_worker --tasks 3``: each task runs a query on the worker thread's
connection, which nothing closes between tasks. ``--close-old`` calls
``close_old_connections()`` before and after each task, as Celery's Django fixup does.
``--linger S`` keeps the process alive S seconds after the last task, connection still open.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import close_old_connections, connection


class Command(BaseCommand):
    help = "Run tasks that query the database, like a Celery worker."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tasks", type=int, default=3)
        parser.add_argument("--interval", type=float, default=0.1)
        parser.add_argument("--linger", type=float, default=0.0)
        parser.add_argument("--close-old", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        for number in range(options["tasks"]):
            if options["close_old"]:
                close_old_connections()
            with connection.cursor() as cursor:  # site: worker-task
                cursor.execute("SELECT pg_backend_pid()")
                row = cursor.fetchone()
            self.stdout.write(f"task {number} ran on backend {row[0] if row else None}")
            if options["close_old"]:
                close_old_connections()
            time.sleep(options["interval"])
        time.sleep(options["linger"])
