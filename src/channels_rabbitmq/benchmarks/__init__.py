"""The benchmark behind ``python -m channels_rabbitmq bench``: this layer beside its peers.

It is split in two because the layers compared cannot all live in one interpreter:

- ``scenarios.py`` measures ONE layer in ONE scenario and prints one JSON line. It runs as a
  script, by its file path, in a fresh subprocess per run, and often under another
  virtualenv's python: the PyPI release of channels_rabbitmq has this project's import name,
  so it can only be measured from a virtualenv of its own. That is why scenarios.py imports
  nothing from channels_rabbitmq (only the layer class it is told to load with --layer) and
  needs nothing but the standard library, the layer and asgiref.
- ``compare.py`` runs in this project's interpreter: it finds which peers can be measured,
  runs scenarios.py for every (round, scenario, layer), and turns the medians into Markdown
  tables. The command-line part (options, progress bar, printing) is
  :mod:`channels_rabbitmq.cli.bench`.
"""
