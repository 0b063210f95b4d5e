"""What the console scripts print: values at full precision, and nothing at all (no traceback)
when the reader of their output has gone away (``edgeos twin get --json | head``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeos.cli import twin_row_text
from edgeos_protocol.pipes import EXIT_CLOSED_PIPE

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def test_twin_get_text_shows_every_value_at_full_precision() -> None:
    def shown(value: float) -> str:
        return twin_row_text({"name": "t", "value": value, "unit": "", "quality": "GOOD"}).split()[
            1
        ]

    assert shown(1999999990.0) == "1999999990"
    assert shown(-123456.789) == "-123456.789"
    assert shown(604 * 0.1) == "60.4"  # a scaled register, without float64's binary noise
    assert shown(123456789.012345) == "123456789.012345"  # 15 significant digits
    assert shown(1 / 3) == "0.333333333333333"


@pytest.mark.parametrize(
    "argv",
    [
        ["edgeos", "check-config", str(ROOT / "examples" / "small-line.toml")],
        ["edgeos", "sim", "--json", "--modbus-port", "0", "--no-opcua", "--nests", "1"],
        ["edgeos-cloud", "init", "{tmp}/receiver", "--broker", "mqtts://127.0.0.1:8883"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_every_console_script_exits_quietly_on_a_closed_pipe(
    argv: list[str], tmp_path: Path
) -> None:
    """(``--help`` would prove nothing: argparse already swallows a failed write.)"""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write (`| head` that has finished)
    try:
        done = subprocess.run(
            [str(BIN / argv[0]), *(a.format(tmp=tmp_path) for a in argv[1:])],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == EXIT_CLOSED_PIPE
