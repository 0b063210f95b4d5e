"""Self-check of the committed models on this device: sha256 and golden outputs, as JSON.

    python -m edgeos.inference.selfcheck [--backend ai_edge_litert|tflite_runtime] [DIR]

Exit status 0 when every manifest in ``DIR`` (default: the repository's ``models/`` and
``models/archive/``) verifies and reproduces its golden outputs within 1e-4. Needs only numpy
and an interpreter package, so it runs on a bare device image too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgeos.inference.errors import ModelError
from edgeos.inference.registry import find_manifests, load_model

__all__ = ["MODELS_DIR", "check_all"]

#: The repository's committed models.
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def check_all(directory: Path = MODELS_DIR, *, backend: str | None = None) -> dict[str, Any]:
    """Verify every manifest under ``directory`` (and its ``archive/``) against its goldens."""
    results: dict[str, Any] = {}
    used = backend
    for path in find_manifests(directory) + find_manifests(directory / "archive"):
        try:
            model = load_model(path, backend=backend)
        except ModelError as exc:
            results[path.name] = {"ok": False, "error": str(exc)}
            continue
        used = model.runner.backend
        golden = directory / "golden" / f"{model.manifest.name}-{model.version}.npz"
        if not golden.exists():
            results[model.key] = {"ok": False, "error": f"no golden file {golden.name}"}
            continue
        data = np.load(golden)
        y = model.runner.run(data["x"])
        err = float(np.max(np.abs(y - data["y"]))) if y.size else 0.0
        ok = bool(np.allclose(y, data["y"], rtol=1e-4, atol=1e-4))
        results[model.key] = {"ok": ok, "max_abs_error": err, "rows": int(y.shape[0])}
    return {
        "backend": used,
        "ok": bool(results) and all(r["ok"] for r in results.values()),
        "models": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeos.inference.selfcheck")
    parser.add_argument("directory", nargs="?", type=Path, default=MODELS_DIR)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)
    report = check_all(args.directory, backend=args.backend)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
