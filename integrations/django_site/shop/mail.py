"""A stand-in for the shop's SMTP relay, which takes a while to accept a message."""

from __future__ import annotations

import time
from collections.abc import Sequence

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend


class SlowRelayBackend(BaseEmailBackend):
    """Accepts every message after half a second, like a busy relay; sends nothing."""

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        time.sleep(0.5)
        return len(email_messages)
