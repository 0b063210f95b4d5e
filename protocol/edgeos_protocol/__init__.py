"""edgeos protocol: what the gateway and the cloud agree on, and nothing else of either.

The wire format (:mod:`.wire`), its cryptography (:mod:`.crypto`), quality codes
(:mod:`.quality`), the credential bundle (:mod:`.credentials`), the OTA bundle format and
outcome vocabulary (:mod:`.bundle`, :mod:`.outcome`), the shared root of the exception tree
(:mod:`.errors`) and the test vectors (``vectors/``). It imports nothing of ``edgeos`` (the
gateway) or ``edgeos_cloud``; import-linter checks that in ``make lint``.
"""

__all__: list[str] = []
