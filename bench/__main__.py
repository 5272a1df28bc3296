"""``python -m bench`` (from the repository's root): see :mod:`bench.run`."""

from __future__ import annotations

import sys

from bench.run import main

sys.exit(main())
