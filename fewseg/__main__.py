"""``python -m fewseg``: the ``fewseg`` command (see :mod:`fewseg.cli`)."""

from fewseg.cli import main

raise SystemExit(main())
