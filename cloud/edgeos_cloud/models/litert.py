"""The cloud's own LiteRT invocation: the interpreter library the gateways run, nothing more.

The quality gate must reproduce golden outputs and measure latency on the **same interpreter
library** the gateways use (``ai-edge-litert``), not on TensorFlow's. The gateway's runner lives
in ``edgeos.inference.runner``, which the cloud may not import; this is the smallest adapter the
gate needs: load from bytes, check the declared shapes, normalise like the gateway
(``(x - mean) / std`` in float32, per feature), invoke in batches, time it.

``ai-edge-litert`` comes with the ``models`` extra of ``edgeos-cloud``; import-linter allows
this one module to import it (pyproject ``[tool.importlinter]``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos_cloud.models.errors import LifecycleError

__all__ = ["LiteModel", "LiteRTUnavailable", "interpreter_version"]

F32 = npt.NDArray[np.float32]


class LiteRTUnavailable(LifecycleError):
    """``ai-edge-litert`` is not installed (pip install 'edgeos-cloud[models]')."""


class ModelUnloadable(LifecycleError):
    """The interpreter refused the model (not a valid flatbuffer, unsupported op, bad shape)."""


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise LiteRTUnavailable(
            f"ai-edge-litert is not installed ({exc}); pip install 'edgeos-cloud[models]'"
        ) from exc
    return Interpreter


def interpreter_version() -> str:
    """``ai-edge-litert <version>`` (stored with every gate report)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ai-edge-litert {version('ai-edge-litert')}"
    except PackageNotFoundError:
        return "ai-edge-litert (not installed)"


class LiteModel:
    """One model on the LiteRT interpreter, resized per batch size on demand."""

    def __init__(
        self,
        blob: bytes,
        *,
        input_shape: Sequence[int],
        output_width: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        cls = _interpreter_class()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_width = int(output_width)
        self._mean = np.asarray(mean, dtype=np.float32)
        self._inv_std = (1.0 / np.asarray(std, dtype=np.float64)).astype(np.float32)
        try:
            self._interp = cls(model_content=blob, num_threads=1)
            inp = self._interp.get_input_details()[0]
            out = self._interp.get_output_details()[0]
        except (ValueError, RuntimeError) as exc:
            raise ModelUnloadable(f"the LiteRT interpreter cannot load it: {exc}") from exc
        declared = tuple(int(d) for d in inp["shape"][1:])
        if declared != self.input_shape:
            raise ModelUnloadable(
                f"input shape {declared} does not match the manifest's {self.input_shape}"
            )
        width = int(np.prod(out["shape"][1:])) if len(out["shape"]) > 1 else 1
        if width != self.output_width:
            raise ModelUnloadable(
                f"output width {width} does not match the manifest's {self.output_width}"
            )
        self._in_index = int(inp["index"])
        self._out_index = int(out["index"])
        self._batch = -1

    def _resize(self, n: int) -> None:
        if n != self._batch:
            self._interp.resize_tensor_input(self._in_index, [n, *self.input_shape])
            self._interp.allocate_tensors()
            self._batch = n

    def run(self, x: npt.ArrayLike, *, batch: int = 80) -> F32:
        """Outputs ``(n, output_width)`` for raw (unnormalised) inputs, ``batch`` rows a call."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape[1:] != self.input_shape:
            raise ValueError(f"expected rows of shape {self.input_shape}, got {arr.shape[1:]}")
        n = arr.shape[0]
        out = np.empty((n, self.output_width), dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            z = ((arr.astype(np.float32) - self._mean) * self._inv_std).astype(np.float32)
        for lo in range(0, n, batch):
            chunk = z[lo : lo + batch]
            self._resize(chunk.shape[0])
            self._interp.set_tensor(self._in_index, chunk)
            self._interp.invoke()
            out[lo : lo + chunk.shape[0]] = self._interp.get_tensor(self._out_index).reshape(
                chunk.shape[0], self.output_width
            )
        return out

    def time_invoke(self, rows: int, *, repeats: int = 200) -> float:
        """Median seconds of one invoke on ``rows`` rows (normalisation excluded)."""
        self._resize(rows)
        self._interp.set_tensor(
            self._in_index, np.zeros((rows, *self.input_shape), dtype=np.float32)
        )
        self._interp.invoke()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self._interp.invoke()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
