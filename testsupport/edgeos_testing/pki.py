"""Test PKI: re-exports :mod:`edgeos_cloud.receiver.pki` (the CA the receiver itself uses)."""

from __future__ import annotations

from edgeos_cloud.receiver.pki import CertificateAuthority, IssuedCertificate

__all__ = ["CertificateAuthority", "IssuedCertificate"]
