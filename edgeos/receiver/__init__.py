"""The thin cloud receiver: verify, deduplicate, store and acknowledge batches; shadows and
commands. See ``docs/receiver.md``; the service is :class:`edgeos.receiver.service.Receiver`,
the console script ``edgeos-receiver`` is :func:`edgeos.receiver.cli.main`.
"""
