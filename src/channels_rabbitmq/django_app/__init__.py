"""The Django app: system checks of the layer's CONFIG and ``manage.py rabbitmq_check``.

Everything Django loads from this project is here: :mod:`.apps` (the AppConfig, label
``channels_rabbitmq``), :mod:`.checks` (the system checks, without I/O) and
``management/commands/rabbitmq_check.py`` (the deployment check for a layer of the settings).
``"channels_rabbitmq"`` and ``"channels_rabbitmq.django_app"`` in ``INSTALLED_APPS`` both load
this package (see :mod:`channels_rabbitmq.apps`). It imports nothing of the command-line tool
(``channels_rabbitmq.cli``); ``make lint`` holds it to that.
"""
