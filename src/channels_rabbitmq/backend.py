"""This layer as Django settings name it: the ``BACKEND`` path, and whether a setting names it.

Shared by the Django system checks (:mod:`.checks`) and the deployment check (:mod:`.deployment_check`),
which both look for this layer among ``CHANNEL_LAYERS``.
"""

from __future__ import annotations

import importlib

from .core import RabbitmqChannelLayer

LAYER_BACKEND = "channels_rabbitmq.core.RabbitmqChannelLayer"


def is_this_layer(backend: object) -> bool:
    """True for this layer's class, under its own path or another that names it or a subclass."""
    if backend == LAYER_BACKEND:
        return True
    if not isinstance(backend, str) or "." not in backend:
        return False
    module_name, _, class_name = backend.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except Exception:
        return False
    return isinstance(found, type) and issubclass(found, RabbitmqChannelLayer)
