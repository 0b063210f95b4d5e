"""Suite-wide fixtures: the leak checks for tasks and threads (edgeos_testing.leaks)."""

pytest_plugins = ["edgeos_testing.leaks"]
