"""The rooms hold: each distribution ships only its own room, and the import contracts are live.

The contracts themselves are in ``pyproject.toml`` (``[tool.importlinter]``) and run in
``make lint``; here each one is shown to *fail* when the import it forbids is added, so a contract
that silently stopped matching anything (a renamed package, a typo) cannot pass unnoticed.
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from edgeos_testing.wheels import build_wheel

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

#: Where each top-level package's source lives in the checkout.
PACKAGES = {
    "edgeos": ROOT / "edgeos",
    "drivers": ROOT / "drivers",
    "edgeos_protocol": ROOT / "protocol" / "edgeos_protocol",
    "edgeos_cloud": ROOT / "cloud" / "edgeos_cloud",
    "edgeos_sim": ROOT / "sim" / "edgeos_sim",
    "edgeos_testing": ROOT / "testsupport" / "edgeos_testing",
}


def _contracts() -> list[dict[str, object]]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts: list[dict[str, object]] = doc["tool"]["importlinter"]["contracts"]
    return contracts


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    tool = VENV_BIN / "lint-imports"
    return subprocess.run(
        [str(tool), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree / "src"), "PATH": str(VENV_BIN)},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six packages side by side under ``src/`` plus the project's import-linter config."""
    tree = tmp_path_factory.mktemp("rooms")
    for name, src in PACKAGES.items():
        shutil.copytree(src, tree / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


# (contract name, file to add the import to, the forbidden import)
VIOLATIONS = [
    (
        "protocol imports neither the gateway nor the cloud",
        "edgeos_protocol/wire.py",
        "import edgeos.config",
    ),
    (
        "gateway imports nothing of the cloud, the simulator/demo or test support",
        "edgeos/app.py",
        "import edgeos_cloud.receiver",
    ),
    (
        "gateway imports nothing of the cloud, the simulator/demo or test support",
        "edgeos/cli.py",
        "import edgeos_sim.demo",
    ),
    (
        "cloud imports nothing of the gateway, its protocol stacks or the simulator",
        "edgeos_cloud/receiver/ingest.py",
        "import edgeos.twin",
    ),
    (
        "cloud imports nothing of the gateway, its protocol stacks or the simulator",
        "edgeos_cloud/receiver/ingest.py",
        "import asyncua",
    ),
    (
        "the gateway core reaches drivers only through the edgeos.drivers entry points",
        "edgeos/scheduler.py",
        "import drivers.modbus",
    ),
    ("drivers are independent of each other", "drivers/opcua/__init__.py", "import drivers.modbus"),
    (
        "the simulator and demo do not need test support",
        "edgeos_sim/cli.py",
        "import edgeos_testing.net",
    ),
]


def test_every_contract_is_exercised_by_a_violation() -> None:
    assert {c["name"] for c in _contracts()} == {name for name, _, _ in VIOLATIONS}


def test_contracts_hold_on_the_unmodified_tree(tree_copy: Path) -> None:
    res = _lint_imports(tree_copy)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Contracts: {len(_contracts())} kept, 0 broken" in res.stdout


@pytest.mark.parametrize(("contract", "file", "line"), VIOLATIONS)
def test_contract_breaks_when_its_forbidden_import_is_added(
    tree_copy: Path, contract: str, file: str, line: str
) -> None:
    target = tree_copy / "src" / file
    original = target.read_text()
    target.write_text(original + f"\n{line}  # added by the test\n")
    try:
        res = _lint_imports(tree_copy)
    finally:
        target.write_text(original)
    assert res.returncode != 0, res.stdout
    assert f"{contract} BROKEN" in res.stdout, res.stdout


def _checkout_copy(dest: Path) -> Path:
    """The distributions' sources in a scratch folder: building in place would leave ``build/``
    folders in the checkout while other tests read it."""
    keep = ("edgeos", "drivers", "protocol", "cloud", "systemd", "pyproject.toml", "README.md")
    for name in keep:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(
                src,
                dest / name,
                ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
            )
        else:
            shutil.copy(src, dest / name)
    return dest


def _top_level_and_requires(wheel: Path) -> tuple[set[str], list[str]]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    # What `pip install <wheel>` installs: the requirements without an ``extra == …`` marker
    # (the dev, speed, bench and models extras are opt-in).
    requires = [
        r.split(";")[0].split("[")[0].strip().lower()
        for r in meta.get_all("Requires-Dist") or []
        if "extra ==" not in r
    ]
    return tops, requires


def _base_names(requires: list[str]) -> set[str]:
    out = set()
    for req in requires:
        name = req
        for sep in "<>=!~ ":
            name = name.split(sep, 1)[0]
        out.add(name)
    return out


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkout_copy(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def gateway_wheel(source_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(source_copy, tmp_path_factory.mktemp("gw-wheel"))


def test_gateway_wheel_ships_gateway_and_protocol_only(gateway_wheel: Path) -> None:
    tops, requires = _top_level_and_requires(gateway_wheel)
    data = {t for t in tops if t.endswith(".data")}
    assert tops - data == {"edgeos", "drivers", "edgeos_protocol"}
    # Besides the packages, only the systemd units (data files: share/edgeos/systemd).
    with zipfile.ZipFile(gateway_wheel) as z:
        data_files = [n for n in z.namelist() if n.split("/", 1)[0] in data]
    assert data_files and all("/data/share/edgeos/systemd/" in n for n in data_files), data_files
    cloud_only = {"psycopg", "amqtt", "mlflow", "tomli-w"}
    assert not _base_names(requires) & cloud_only, requires


def test_cloud_wheel_ships_cloud_and_protocol_only(source_copy: Path, tmp_path: Path) -> None:
    wheel = build_wheel(source_copy / "cloud", tmp_path)
    tops, requires = _top_level_and_requires(wheel)
    assert tops == {"edgeos_cloud", "edgeos_protocol"}
    gateway_only = {"asyncua", "pymodbus", "pyserial", "sdnotify", "edgeos"}
    assert not _base_names(requires) & gateway_only, requires
    # The model lifecycle's gate runs models on the gateways' interpreter library: LiteRT may
    # come with the optional `models` extra only (docs/model-lifecycle.md), never by default.
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")))
    litert = [
        r
        for r in email.message_from_bytes(meta).get_all("Requires-Dist") or []
        if r.lower().startswith("ai-edge-litert")
    ]
    assert all('extra == "models"' in r for r in litert), litert


def test_installed_gateway_cannot_import_the_cloud(gateway_wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "gw"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", str(gateway_wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "import importlib.util as u, sys; "
        "print([m for m in ('edgeos', 'drivers', 'edgeos_protocol', 'edgeos_cloud', "
        "'edgeos_sim', 'edgeos_testing') if u.find_spec(m) is not None])"
    )
    out = subprocess.run(
        [str(py), "-I", "-c", probe], check=True, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "['edgeos', 'drivers', 'edgeos_protocol']"
