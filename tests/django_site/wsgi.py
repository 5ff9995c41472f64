from __future__ import annotations

from tests.django_site.boot import boot

boot()

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
