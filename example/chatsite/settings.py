"""Settings of the chat demo: no database, one channel layer on RabbitMQ.

``AMQP_URL`` picks the broker (default: the local one, guest/guest). ``CHAT_SERVER_NAME``
names this server process in the messages it relays; ``serve.py`` sets it to the port.
"""

from __future__ import annotations

import os

SECRET_KEY = "channels-rabbitmq-demo-not-a-secret"  # a demo on 127.0.0.1 only
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["channels", "chat"]
MIDDLEWARE = ["django.middleware.csrf.CsrfViewMiddleware"]
ROOT_URLCONF = "chatsite.urls"
ASGI_APPLICATION = "chatsite.asgi.application"
DATABASES: dict[str, dict[str, str]] = {}
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
USE_TZ = True

CHAT_SERVER_NAME = os.environ.get("CHAT_SERVER_NAME", "dev")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_rabbitmq.core.RabbitmqChannelLayer",
        "CONFIG": {"host": os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"channels_rabbitmq": {"handlers": ["console"], "level": "INFO"}},
}
