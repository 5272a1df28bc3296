"""Why ``"channels_rabbitmq"`` in ``INSTALLED_APPS`` still loads the Django app, which lives in
:mod:`channels_rabbitmq.django_app`: a compatibility shim, nothing else.

For an entry ``"channels_rabbitmq"``, Django's ``AppConfig.create`` imports the package, then
its ``apps`` submodule (this one), and takes the one ``AppConfig`` subclass it finds there. It
then builds the app from that class's ``name``, ``"channels_rabbitmq.django_app"``: the app's
module and path, and so its ``management/commands`` and ``ready()`` (which registers the
checks), are those of :mod:`channels_rabbitmq.django_app`, and its label stays
``"channels_rabbitmq"``. Without this module, Django would make a bare app of the package
root: no checks and no ``rabbitmq_check``, and no error. Import no other ``AppConfig``
subclass here: with two candidates and neither marked ``default = True``, Django falls back
to that same bare app.
"""

from __future__ import annotations

from .django_app.apps import ChannelsRabbitmqConfig

__all__ = ["ChannelsRabbitmqConfig"]
