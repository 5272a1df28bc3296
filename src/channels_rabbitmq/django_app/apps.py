"""The Django app's AppConfig: ``"channels_rabbitmq"`` (or ``"channels_rabbitmq.django_app"``) in
``INSTALLED_APPS`` gives the system checks (``manage.py check``: :mod:`.checks`) and the
``manage.py rabbitmq_check`` command."""

from __future__ import annotations

from django.apps import AppConfig


class ChannelsRabbitmqConfig(AppConfig):  # type: ignore[misc]  # Django ships no types
    name = "channels_rabbitmq.django_app"
    #: The label the app had at the package root: the check tag and ids, and anything
    #: keyed on the label, stay the same whichever spelling INSTALLED_APPS uses.
    label = "channels_rabbitmq"
    verbose_name = "Channels on RabbitMQ"

    def ready(self) -> None:
        """Register the system checks (importing the module does)."""
        from . import checks  # noqa: F401
