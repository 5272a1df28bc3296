"""The Django app: add ``"channels_rabbitmq"`` to ``INSTALLED_APPS`` for its system checks
(``manage.py check``: :mod:`.checks`) and the ``manage.py rabbitmq_check`` command."""

from __future__ import annotations

from django.apps import AppConfig


class ChannelsRabbitmqConfig(AppConfig):  # type: ignore[misc]  # Django ships no types
    name = "channels_rabbitmq"
    verbose_name = "Channels on RabbitMQ"

    def ready(self) -> None:
        """Register the system checks (importing the module does)."""
        from . import checks  # noqa: F401
