"""Settings of the test project: no database, one channel layer on RabbitMQ.

The broker comes from ``CHANNELS_RABBITMQ_TEST_URL`` (the test run's private vhost);
``SERVER_NAME`` tells which server process relayed a message.
"""

from __future__ import annotations

import os

SECRET_KEY = "channels-rabbitmq-tests-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]

# The documented entry: channels_rabbitmq/apps.py hands Django the app of channels_rabbitmq.django_app
# (its system checks, rabbitmq_check).
INSTALLED_APPS = ["channels", "channels_rabbitmq"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "tests.django_project.urls"
ASGI_APPLICATION = "tests.django_project.asgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

#: Which server process this is, in every message a consumer relays.
TEST_SERVER_NAME = os.environ.get("SERVER_NAME", "in-process")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_rabbitmq.core.RabbitmqChannelLayer",
        "CONFIG": {
            "host": os.environ.get("CHANNELS_RABBITMQ_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        },
    },
}
