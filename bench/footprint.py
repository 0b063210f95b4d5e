"""What the gateway costs a device: code shipped, installed size, import time, idle RSS (JSON).

    .venv/bin/python bench/footprint.py                       # this checkout
    .venv/bin/python bench/footprint.py --installed           # + a fresh venv with every dependency
    OTHER/.venv/bin/python bench/footprint.py --tree OTHER    # another checkout (before/after)

* ``wheel``: the gateway distribution built from ``--tree`` — files, Python lines and bytes per
  top-level package (what ``pip install .`` puts on a Raspberry Pi);
* ``installed_mb``: site-packages of a fresh venv after ``pip install <wheel>`` with its
  dependencies (``--installed``; needs the package index or pip's cache);
* ``importtime_ms``: cumulative ``python -X importtime -c "import edgeos.app"``, min and median
  of 12 runs;
* ``idle_rss_mb``: ``edgeos run`` on ``examples/small-line.toml`` against the simulator (4 presses
  × 20 tags, Modbus TCP + OPC UA), uplink off, median of 5 samples after a 20 s settle.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wheel_figures(tree: Path, python: Path, out: Path) -> dict[str, object]:
    subprocess.run(
        [str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(tree)],
        check=True,
        capture_output=True,
    )
    wheel = next(out.glob("edgeos-*.whl"))
    files: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            top = info.filename.split("/", 1)[0]
            if top.endswith(".dist-info"):
                continue
            files[top] += 1
            if info.filename.endswith(".py"):
                lines[top] += zf.read(info).count(b"\n")
    return {
        "file": wheel.name,
        "bytes": wheel.stat().st_size,
        "files": dict(files),
        "py_lines": dict(lines),
        "py_lines_total": sum(lines.values()),
        "path": str(wheel),
    }


def installed_mb(python: Path, wheel: Path, work: Path) -> float:
    venv = work / "venv"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = next((venv / "lib").glob("python3*/site-packages"))
    total = sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())
    return round(total / 1e6, 1)


def importtime_ms(python: Path, tree: Path, count: int = 12) -> dict[str, float]:
    """Min and median of ``count`` runs: the minimum is what the code costs, the median
    what it cost on this (possibly busy) machine."""
    runs = []
    for _ in range(count):
        res = subprocess.run(
            [str(python), "-X", "importtime", "-c", "import edgeos.app"],
            capture_output=True,
            text=True,
            check=True,
            cwd=tree,
        )
        for line in res.stderr.splitlines():
            m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*edgeos\.app$", line)
            if m:
                runs.append(int(m.group(1)) / 1000)
    return {"min": round(min(runs), 1), "median": round(statistics.median(runs), 1)}


def idle_rss_mb(python: Path, tree: Path, work: Path, settle_s: float) -> float:
    modbus, opcua = _free_port(), _free_port()
    text = (tree / "examples/small-line.toml").read_text()
    text = text.replace('state_dir = "/var/lib/edgeos"', f'state_dir = "{work / "state"}"')
    text = re.sub(r"tcp://[^\"]+:5020", f"tcp://127.0.0.1:{modbus}", text)
    text = re.sub(r"opc\.tcp://[^\"]+:4840", f"opc.tcp://127.0.0.1:{opcua}", text)
    text = re.sub(r"(\[uplink\]\s*\n)enabled = true", r"\1enabled = false", text)
    cfg = work / "small-line.toml"
    cfg.write_text(text)
    (work / "state").mkdir()
    edgeos = [str(python), "-m", "edgeos"]
    sim = subprocess.Popen(
        [
            *edgeos,
            "sim",
            "--nests",
            "4",
            "--tags-per-nest",
            "20",
            "--modbus-port",
            str(modbus),
            "--opcua-port",
            str(opcua),
        ],
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = None
    try:
        time.sleep(3)  # a benchmark, not a test: the simulator binds within a second or two
        run = subprocess.Popen(
            [*edgeos, "run", "--config", str(cfg)],
            cwd=tree,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(settle_s)
        if run.poll() is not None:
            raise RuntimeError(f"edgeos run exited with {run.returncode}")
        samples = []
        for _ in range(5):
            status = Path(f"/proc/{run.pid}/status").read_text()
            kb = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
            samples.append(kb / 1024)
            time.sleep(2)
        return round(statistics.median(samples), 1)
    finally:
        for proc in (run, sim):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=HERE, help="checkout to measure")
    parser.add_argument("--installed", action="store_true", help="also the installed size")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds before RSS samples")
    parser.add_argument("--quick", action="store_true", help="skip the RSS run")
    args = parser.parse_args()
    python = Path(sys.executable)
    tree = args.tree.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "wheel").mkdir()
        wheel = wheel_figures(tree, python, work / "wheel")
        result: dict[str, object] = {"tree": str(tree), "wheel": wheel}
        if args.installed:
            (work / "inst").mkdir()
            result["installed_mb"] = installed_mb(python, Path(str(wheel["path"])), work / "inst")
        result["importtime_ms"] = importtime_ms(python, tree)
        if not args.quick:
            (work / "rss").mkdir()
            result["idle_rss_mb"] = idle_rss_mb(python, tree, work / "rss", args.settle)
    wheel.pop("path")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
