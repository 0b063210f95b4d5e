"""One POST of a sealed body to a cloud service (OTA outcome reports, certificate renewal).

No retries and no redirects: when to try again is the caller's policy. ``urllib3`` is imported
when a POST is made, so a gateway that never reports or renews never loads it.
"""

from __future__ import annotations

__all__ = ["PostFailed", "post_sealed"]


class PostFailed(Exception):
    """The POST did not reach the service (``status`` is ``None``) or was not answered 200."""

    def __init__(self, message: str, status: int | None = None, body: bytes = b"") -> None:
        self.status = status
        self.body = body
        super().__init__(message)


def post_sealed(url: str, body: bytes, *, timeout_s: float) -> bytes:
    """POST ``body`` as ``application/octet-stream`` to ``url``; the answer's body on HTTP 200.

    Raises :class:`PostFailed`: with ``status`` ``None`` when the network failed, otherwise
    with the status and body of the refusal.
    """
    import urllib3

    pool = urllib3.PoolManager()
    try:
        response = pool.request(
            "POST",
            url,
            body=body,
            headers={"Content-Type": "application/octet-stream"},
            timeout=urllib3.Timeout(total=timeout_s),
            retries=False,
        )
    except urllib3.exceptions.HTTPError as exc:
        raise PostFailed(str(exc)) from exc
    finally:
        pool.clear()
    if response.status != 200:
        raise PostFailed(f"HTTP {response.status}", response.status, bytes(response.data))
    return bytes(response.data)
