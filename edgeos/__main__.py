"""``python -m edgeos``: the same as the ``edgeos`` command (used by the slot launcher)."""

from edgeos.cli import main

raise SystemExit(main())
