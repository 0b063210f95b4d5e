"""The Sparkplug B payload schema (Eclipse Tahu ``sparkplug_b.proto``), for Google's protobuf.

The bytes below (base64) are ``protoc``'s serialized ``FileDescriptorProto`` of the
specification's own payload definition (package ``org.eclipse.tahu.protobuf``, Sparkplug B
3.0; byte-identical to what ``protoc --python_out`` embeds in ``sparkplug_b_pb2.py``). Encoding
and decoding is done by the ``protobuf`` runtime, never by hand. It is loaded into a *private*
descriptor pool so another Sparkplug library in the same process (a host application, a
plug-in) cannot clash with it in protobuf's default pool.

Regenerate: ``protoc --descriptor_set_out=/dev/stdout sparkplug_b.proto`` (take the one file of
the set) from https://github.com/eclipse/tahu ``sparkplug_b/sparkplug_b.proto``.
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import descriptor_pool, message_factory  # type: ignore[import-untyped]

__all__ = ["DATATYPES", "Payload"]

_SERIALIZED = base64.b64decode(
    "ChFzcGFya3BsdWdfYi5wcm90bxIZb3JnLmVjbGlwc2UudGFodS5wcm90b2J1ZiLuFQoHUGF5bG9hZBIRCgl0aW1l"
    "c3RhbXAYASABKAQSOgoHbWV0cmljcxgCIAMoCzIpLm9yZy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9hZC5N"
    "ZXRyaWMSCwoDc2VxGAMgASgEEgwKBHV1aWQYBCABKAkSDAoEYm9keRgFIAEoDBqmBAoIVGVtcGxhdGUSDwoHdmVy"
    "c2lvbhgBIAEoCRI6CgdtZXRyaWNzGAIgAygLMikub3JnLmVjbGlwc2UudGFodS5wcm90b2J1Zi5QYXlsb2FkLk1l"
    "dHJpYxJJCgpwYXJhbWV0ZXJzGAMgAygLMjUub3JnLmVjbGlwc2UudGFodS5wcm90b2J1Zi5QYXlsb2FkLlRlbXBs"
    "YXRlLlBhcmFtZXRlchIUCgx0ZW1wbGF0ZV9yZWYYBCABKAkSFQoNaXNfZGVmaW5pdGlvbhgFIAEoCBrKAgoJUGFy"
    "YW1ldGVyEgwKBG5hbWUYASABKAkSDAoEdHlwZRgCIAEoDRITCglpbnRfdmFsdWUYAyABKA1IABIUCgpsb25nX3Zh"
    "bHVlGAQgASgESAASFQoLZmxvYXRfdmFsdWUYBSABKAJIABIWCgxkb3VibGVfdmFsdWUYBiABKAFIABIXCg1ib29s"
    "ZWFuX3ZhbHVlGAcgASgISAASFgoMc3RyaW5nX3ZhbHVlGAggASgJSAASaAoPZXh0ZW5zaW9uX3ZhbHVlGAkgASgL"
    "Mk0ub3JnLmVjbGlwc2UudGFodS5wcm90b2J1Zi5QYXlsb2FkLlRlbXBsYXRlLlBhcmFtZXRlci5QYXJhbWV0ZXJW"
    "YWx1ZUV4dGVuc2lvbkgAGiMKF1BhcmFtZXRlclZhbHVlRXh0ZW5zaW9uKggIARCAgICAAkIHCgV2YWx1ZSoICAYQ"
    "gICAgAIalwQKB0RhdGFTZXQSFgoObnVtX29mX2NvbHVtbnMYASABKAQSDwoHY29sdW1ucxgCIAMoCRINCgV0eXBl"
    "cxgDIAMoDRI8CgRyb3dzGAQgAygLMi4ub3JnLmVjbGlwc2UudGFodS5wcm90b2J1Zi5QYXlsb2FkLkRhdGFTZXQu"
    "Um93Gq8CCgxEYXRhU2V0VmFsdWUSEwoJaW50X3ZhbHVlGAEgASgNSAASFAoKbG9uZ192YWx1ZRgCIAEoBEgAEhUK"
    "C2Zsb2F0X3ZhbHVlGAMgASgCSAASFgoMZG91YmxlX3ZhbHVlGAQgASgBSAASFwoNYm9vbGVhbl92YWx1ZRgFIAEo"
    "CEgAEhYKDHN0cmluZ192YWx1ZRgGIAEoCUgAEmgKD2V4dGVuc2lvbl92YWx1ZRgHIAEoCzJNLm9yZy5lY2xpcHNl"
    "LnRhaHUucHJvdG9idWYuUGF5bG9hZC5EYXRhU2V0LkRhdGFTZXRWYWx1ZS5EYXRhU2V0VmFsdWVFeHRlbnNpb25I"
    "ABohChVEYXRhU2V0VmFsdWVFeHRlbnNpb24qCAgBEICAgIACQgcKBXZhbHVlGloKA1JvdxJJCghlbGVtZW50cxgB"
    "IAMoCzI3Lm9yZy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9hZC5EYXRhU2V0LkRhdGFTZXRWYWx1ZSoICAIQ"
    "gICAgAIqCAgFEICAgIACGukDCg1Qcm9wZXJ0eVZhbHVlEgwKBHR5cGUYASABKA0SDwoHaXNfbnVsbBgCIAEoCBIT"
    "CglpbnRfdmFsdWUYAyABKA1IABIUCgpsb25nX3ZhbHVlGAQgASgESAASFQoLZmxvYXRfdmFsdWUYBSABKAJIABIW"
    "Cgxkb3VibGVfdmFsdWUYBiABKAFIABIXCg1ib29sZWFuX3ZhbHVlGAcgASgISAASFgoMc3RyaW5nX3ZhbHVlGAgg"
    "ASgJSAASSwoRcHJvcGVydHlzZXRfdmFsdWUYCSABKAsyLi5vcmcuZWNsaXBzZS50YWh1LnByb3RvYnVmLlBheWxv"
    "YWQuUHJvcGVydHlTZXRIABJQChJwcm9wZXJ0eXNldHNfdmFsdWUYCiABKAsyMi5vcmcuZWNsaXBzZS50YWh1LnBy"
    "b3RvYnVmLlBheWxvYWQuUHJvcGVydHlTZXRMaXN0SAASYgoPZXh0ZW5zaW9uX3ZhbHVlGAsgASgLMkcub3JnLmVj"
    "bGlwc2UudGFodS5wcm90b2J1Zi5QYXlsb2FkLlByb3BlcnR5VmFsdWUuUHJvcGVydHlWYWx1ZUV4dGVuc2lvbkgA"
    "GiIKFlByb3BlcnR5VmFsdWVFeHRlbnNpb24qCAgBEICAgIACQgcKBXZhbHVlGmcKC1Byb3BlcnR5U2V0EgwKBGtl"
    "eXMYASADKAkSQAoGdmFsdWVzGAIgAygLMjAub3JnLmVjbGlwc2UudGFodS5wcm90b2J1Zi5QYXlsb2FkLlByb3Bl"
    "cnR5VmFsdWUqCAgDEICAgIACGmAKD1Byb3BlcnR5U2V0TGlzdBJDCgtwcm9wZXJ0eXNldBgBIAMoCzIuLm9yZy5l"
    "Y2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9hZC5Qcm9wZXJ0eVNldCoICAIQgICAgAIapAEKCE1ldGFEYXRhEhUK"
    "DWlzX211bHRpX3BhcnQYASABKAgSFAoMY29udGVudF90eXBlGAIgASgJEgwKBHNpemUYAyABKAQSCwoDc2VxGAQg"
    "ASgEEhEKCWZpbGVfbmFtZRgFIAEoCRIRCglmaWxlX3R5cGUYBiABKAkSCwoDbWQ1GAcgASgJEhMKC2Rlc2NyaXB0"
    "aW9uGAggASgJKggICRCAgICAAhq/BQoGTWV0cmljEgwKBG5hbWUYASABKAkSDQoFYWxpYXMYAiABKAQSEQoJdGlt"
    "ZXN0YW1wGAMgASgEEhAKCGRhdGF0eXBlGAQgASgNEhUKDWlzX2hpc3RvcmljYWwYBSABKAgSFAoMaXNfdHJhbnNp"
    "ZW50GAYgASgIEg8KB2lzX251bGwYByABKAgSPQoIbWV0YWRhdGEYCCABKAsyKy5vcmcuZWNsaXBzZS50YWh1LnBy"
    "b3RvYnVmLlBheWxvYWQuTWV0YURhdGESQgoKcHJvcGVydGllcxgJIAEoCzIuLm9yZy5lY2xpcHNlLnRhaHUucHJv"
    "dG9idWYuUGF5bG9hZC5Qcm9wZXJ0eVNldBITCglpbnRfdmFsdWUYCiABKA1IABIUCgpsb25nX3ZhbHVlGAsgASgE"
    "SAASFQoLZmxvYXRfdmFsdWUYDCABKAJIABIWCgxkb3VibGVfdmFsdWUYDSABKAFIABIXCg1ib29sZWFuX3ZhbHVl"
    "GA4gASgISAASFgoMc3RyaW5nX3ZhbHVlGA8gASgJSAASFQoLYnl0ZXNfdmFsdWUYECABKAxIABJDCg1kYXRhc2V0"
    "X3ZhbHVlGBEgASgLMioub3JnLmVjbGlwc2UudGFodS5wcm90b2J1Zi5QYXlsb2FkLkRhdGFTZXRIABJFCg50ZW1w"
    "bGF0ZV92YWx1ZRgSIAEoCzIrLm9yZy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9hZC5UZW1wbGF0ZUgAElkK"
    "D2V4dGVuc2lvbl92YWx1ZRgTIAEoCzI+Lm9yZy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9hZC5NZXRyaWMu"
    "TWV0cmljVmFsdWVFeHRlbnNpb25IABogChRNZXRyaWNWYWx1ZUV4dGVuc2lvbioICAEQgICAgAJCBwoFdmFsdWUq"
    "CAgGEICAgIACKvIDCghEYXRhVHlwZRILCgdVbmtub3duEAASCAoESW50OBABEgkKBUludDE2EAISCQoFSW50MzIQ"
    "AxIJCgVJbnQ2NBAEEgkKBVVJbnQ4EAUSCgoGVUludDE2EAYSCgoGVUludDMyEAcSCgoGVUludDY0EAgSCQoFRmxv"
    "YXQQCRIKCgZEb3VibGUQChILCgdCb29sZWFuEAsSCgoGU3RyaW5nEAwSDAoIRGF0ZVRpbWUQDRIICgRUZXh0EA4S"
    "CAoEVVVJRBAPEgsKB0RhdGFTZXQQEBIJCgVCeXRlcxAREggKBEZpbGUQEhIMCghUZW1wbGF0ZRATEg8KC1Byb3Bl"
    "cnR5U2V0EBQSEwoPUHJvcGVydHlTZXRMaXN0EBUSDQoJSW50OEFycmF5EBYSDgoKSW50MTZBcnJheRAXEg4KCklu"
    "dDMyQXJyYXkQGBIOCgpJbnQ2NEFycmF5EBkSDgoKVUludDhBcnJheRAaEg8KC1VJbnQxNkFycmF5EBsSDwoLVUlu"
    "dDMyQXJyYXkQHBIPCgtVSW50NjRBcnJheRAdEg4KCkZsb2F0QXJyYXkQHhIPCgtEb3VibGVBcnJheRAfEhAKDEJv"
    "b2xlYW5BcnJheRAgEg8KC1N0cmluZ0FycmF5ECESEQoNRGF0ZVRpbWVBcnJheRAiQiwKGW9yZy5lY2xpcHNlLnRh"
    "aHUucHJvdG9idWZCD1NwYXJrcGx1Z0JQcm90bw=="
)

_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(_SERIALIZED)

#: ``org.eclipse.tahu.protobuf.Payload`` (a protobuf message class).
Payload: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload")
)

#: Sparkplug B ``DataType`` enum: name -> number (``Int32`` = 3, ``Double`` = 10, …).
DATATYPES: dict[str, int] = {
    v.name: v.number for v in _POOL.FindEnumTypeByName("org.eclipse.tahu.protobuf.DataType").values
}
