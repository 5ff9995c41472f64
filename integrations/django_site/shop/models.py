from __future__ import annotations

from decimal import Decimal

from django.db import models


class Order(models.Model):
    email: models.EmailField[str, str] = models.EmailField()
    total: models.DecimalField[Decimal, Decimal] = models.DecimalField(
        max_digits=10, decimal_places=2
    )
