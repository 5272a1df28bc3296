"""A Django Channels channel layer on RabbitMQ.

Use it in settings as ``"BACKEND": "channels_rabbitmq.core.RabbitmqChannelLayer"``.
"""

__version__ = "0.1.0"
