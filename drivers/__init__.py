"""Protocol drivers, found through the ``edgeos.drivers`` entry-point group.

Each driver is a sub-package with its own pydantic options model; see ``docs/drivers.md``.
"""
