from __future__ import annotations

from tests.django_site.boot import boot

boot()

from django.core.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()
