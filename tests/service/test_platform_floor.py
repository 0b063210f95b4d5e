"""The gateway's installed dependency closure runs on the oldest target: JetPack 6.

JetPack 6 is Ubuntu 22.04 (glibc 2.35) with Ubuntu's python3.11, a 3.11.0 build from the
release-candidate series (docs/arm64.md "Jetson"). The Raspberry Pi OS bookworm root has glibc
2.36 and 3.11.2, so whatever runs on the Jetson runs on the Pi. This reads what pip actually
installed here (in the arm64 lane: the aarch64 wheels a device gets; images/arm64/ci-tests.txt
runs it there): every binary wheel of the gateway's runtime dependencies must carry a manylinux
tag whose glibc floor is at most 2.35, nothing may have been compiled locally (a device has no
compiler), and every distribution's Requires-Python must admit 3.11.0.
"""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

JETPACK6_GLIBC = (2, 35)
JETPACK6_PYTHON = Version("3.11.0")  # pip compares sys.version_info[:3]: 3.11.0rc1 -> 3.11.0

_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def _closure(root: str) -> dict[str, metadata.Distribution]:
    """The installed distributions `root` needs at run time (no extras), by canonical name."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _glibc_floor(tag: str) -> tuple[int, int] | None:
    """The glibc a wheel tag's platform part needs, None for pure wheels."""
    platform = tag.rsplit("-", maxsplit=1)[-1]
    if platform == "any":
        return None
    m = re.match(r"manylinux_(\d+)_(\d+)_", platform)
    if m:
        return int(m.group(1)), int(m.group(2))
    legacy = platform.split("_", 1)[0]
    if legacy in _LEGACY:
        return _LEGACY[legacy]
    raise ValueError(f"no known glibc floor for platform tag {platform!r}")


def test_gateway_runtime_wheels_need_at_most_jetpack6_glibc_and_python():
    closure = _closure("edgeos")
    assert {"numpy", "cryptography", "pydantic-core", "zstandard"} <= closure.keys(), (
        "the gateway's closure lost its known binary dependencies: the walk is broken"
    )
    floors: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    for name, dist in sorted(closure.items()):
        requires_python = dist.metadata.get("Requires-Python")
        if requires_python and not SpecifierSet(requires_python).contains(
            JETPACK6_PYTHON, prereleases=True
        ):
            problems.append(f"{name} {dist.version}: Requires-Python {requires_python}")
        if name == "edgeos":
            continue  # this checkout (an editable install: no wheel of its own)
        wheel = dist.read_text("WHEEL")
        if wheel is None:
            problems.append(f"{name} {dist.version}: not installed from a wheel (no WHEEL file)")
            continue
        tags = [ln.split(":", 1)[1].strip() for ln in wheel.splitlines() if ln.startswith("Tag:")]
        if any(t.rsplit("-", maxsplit=1)[-1].startswith("linux_") for t in tags):
            problems.append(f"{name} {dist.version}: compiled on this machine ({tags})")
            continue
        found = [f for f in map(_glibc_floor, tags) if f is not None]
        if found:
            floors[name] = min(found)  # a wheel installs where any one of its tags fits
    assert len(floors) >= 4, f"too few binary wheels seen to judge: {floors}"
    too_new = {n: f for n, f in floors.items() if f > JETPACK6_GLIBC}
    assert not too_new, f"wheels need a newer glibc than JetPack 6's 2.35: {too_new}"
    assert not problems, "\n".join(problems)
    print(f"glibc floors of {len(floors)} binary wheels (JetPack 6 has 2.35): {floors}")
