"""edgeos cloud: the receiver and its storage, the provisioning CA, the OTA repository and
campaigns (and, next, the fleet services). It shares only :mod:`edgeos_protocol` with the
gateway; ``edgeos-cloud`` (alias ``edgeos-receiver``) is :func:`edgeos_cloud.cli.main`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
