"""Suite-wide fixtures: the leak checks for tasks and threads (edgeos.testing.leaks)."""

pytest_plugins = ["edgeos.testing.leaks"]
