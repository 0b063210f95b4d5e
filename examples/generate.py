"""Regenerate the example configurations from the simulator's layout (deterministic).

python examples/generate.py          # writes examples/tyre-line.toml, small-line.toml
python examples/generate.py --check  # exit 1 if a committed file is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgeos_sim.configgen import render_small_line, render_tyre_line

HERE = Path(__file__).resolve().parent
FILES = {
    "tyre-line.toml": render_tyre_line,
    "small-line.toml": render_small_line,
}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, render in FILES.items():
        path = HERE / name
        text = render()
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({text.count(chr(10))} lines)")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python examples/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
