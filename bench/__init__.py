"""Benchmarks of the layer, run from a clone of the repository (not part of the installed package).

- ``python -m bench`` (``make bench``): this layer beside its peers, with a progress bar and
  Markdown tables. It is split in two because the layers compared cannot all live in one
  interpreter:

  - ``scenarios.py`` measures ONE layer in ONE scenario and prints one JSON line. It runs as a
    script, by its file path, in a fresh subprocess per run, and often under another
    virtualenv's python: the PyPI release of channels_rabbitmq has this project's import name,
    so it can only be measured from a virtualenv of its own. That is why scenarios.py imports
    nothing from channels_rabbitmq (only the layer class it is told to load with --layer) and
    needs nothing but the standard library, the layer and asgiref.
  - ``compare.py`` runs in this project's interpreter: it finds which peers can be measured,
    runs scenarios.py for every (round, scenario, layer), and turns the medians into Markdown
    tables. ``run.py`` is the command line around it (options, progress bar, printing).

- ``python -m bench e2e`` (:mod:`bench.e2e`): a Channels websocket chat on two uvicorn servers
  (:mod:`bench.e2e_app`) with real websocket clients: stepped load and a connect storm, for this
  layer and channels_redis's two, with the servers' and the broker's CPU per delivered message.

Only the layer's stable surface is used: ``channels_rabbitmq.core.RabbitmqChannelLayer``,
``channels_rabbitmq.__version__`` and ``channels_rabbitmq.config.parse_amqp_url``.
"""
