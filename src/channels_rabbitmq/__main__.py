"""``python -m channels_rabbitmq``: the command-line tool (see :mod:`channels_rabbitmq.cli`)."""

import sys

from .cli import main

sys.exit(main())
