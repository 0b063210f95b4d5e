"""The uplink: wire format and crypto (shared with the receiver), spool, batcher, publisher.

Import the parts from their modules (``edgeos_protocol.wire``, ``edgeos_protocol.crypto``, …);
this package module stays empty so the receiver can import the wire format without pulling
in the MQTT client.
"""
