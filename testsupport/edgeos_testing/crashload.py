"""A spool writer to be killed: the child process of the spool's kill -9 tests.

``python -m edgeos_testing.crashload DIR SEED FSYNC`` opens the spool in ``DIR``, announces
``R`` (ready), then appends records forever under a fresh random epoch, printing
``A <epoch> <seq>`` after each :meth:`Spool.append` returned, and ``K <epoch> <seq>`` *before*
each ack (an ack's effect may land even if the kill comes before the line). Payloads are a
pure function of ``(epoch, seq)`` (:func:`payload_for`) so the parent can check them.
"""

from __future__ import annotations

import hashlib
import random
import sys

from edgeos.uplink.spool import Spool

__all__ = ["payload_for"]


def payload_for(epoch: int, seq: int) -> bytes:
    """The deterministic payload of a record (100 B to 20 kB)."""
    seed = hashlib.sha256(f"{epoch}:{seq}".encode()).digest()
    length = 100 + int.from_bytes(seed[:2], "big") % 20_000
    return (seed * (length // 32 + 1))[:length]


def main(argv: list[str]) -> None:
    directory, seed, fsync = argv[0], int(argv[1]), argv[2] == "1"
    rng = random.Random(seed)
    out = sys.stdout
    spool = Spool(directory, segment_bytes=64 << 10, max_bytes=1 << 40, fsync=fsync)
    # Acknowledge part of what earlier runs left, like a receiver catching up.
    for epoch, seq in spool.pending_keys():
        if rng.random() < 0.3:
            out.write(f"K {epoch} {seq}\n")
            out.flush()
            spool.ack(epoch, seq)
    epoch = rng.getrandbits(64)
    out.write("R\n")
    out.flush()
    seq = 0
    while True:
        seq += 1
        spool.append(epoch, seq, payload_for(epoch, seq))
        out.write(f"A {epoch} {seq}\n")
        out.flush()
        if seq % 7 == 0:
            out.write(f"K {epoch} {seq - 5}\n")
            out.flush()
            spool.ack(epoch, seq - 5)


if __name__ == "__main__":
    main(sys.argv[1:])
