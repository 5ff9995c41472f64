"""The shop's views. ``checkout`` hands the order confirmation to a few mailer threads, so
that the customer does not wait for the mail relay; those threads are the leak."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from django.core.mail import send_mail
from django.db.models import Sum
from django.http import HttpRequest, JsonResponse

from .models import Order

#: Background threads that send the confirmation mails, one at a time each.
mailer = ThreadPoolExecutor(max_workers=3, thread_name_prefix="mailer")


def orders(request: HttpRequest) -> JsonResponse:
    total = Order.objects.aggregate(total=Sum("total"))["total"]
    return JsonResponse({"orders": Order.objects.count(), "total": str(total or 0)})


def checkout(request: HttpRequest) -> JsonResponse:
    order = Order.objects.create(email=request.GET["email"], total=Decimal("19.90"))
    mailer.submit(send_confirmation, order.pk)
    return JsonResponse({"order": order.pk})


def send_confirmation(order_id: int) -> None:
    # BUG: Django closes the connections of requests at their end, not those of threads it did
    # not start. This query opens the mailer thread's own connection, which the thread keeps
    # while it waits for the next mail, forever. The fix: call
    # django.db.close_old_connections() before and after each task, as Celery does.
    order = Order.objects.get(pk=order_id)  # <- the leaking line
    send_mail(
        f"Your order #{order.pk}",
        f"Thank you! Total: {order.total} EUR",
        "shop@example.com",
        [order.email],
    )
