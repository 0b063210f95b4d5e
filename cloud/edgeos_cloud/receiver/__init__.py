"""The thin cloud receiver: verify, deduplicate, store and acknowledge batches; shadows and
commands. See ``docs/receiver.md``; the service is :class:`edgeos_cloud.receiver.service.Receiver`,
the console script ``edgeos-receiver`` is :func:`edgeos_cloud.cli.main`.
"""
