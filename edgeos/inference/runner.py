"""The one interpreter adapter: LiteRT (``ai-edge-litert``) or ``tflite-runtime``, batched.

The backend is chosen when this module is imported: ``ai_edge_litert`` when it imports, else
``tflite_runtime`` (what a Raspberry Pi image often has). ``EDGEOS_TFLITE_BACKEND`` forces one
for the whole process; ``Runner(..., backend=...)`` forces one for a runner (tests run both).

A :class:`Runner` owns one model and allocates everything up front: for each batch *bucket*
(by default 1, 8 and ``max_batch``) an interpreter resized to that batch and allocated once, a
float32 input buffer, and an output buffer. A call normalises the raw features straight into the
bucket's input buffer (``(x - mean) / std``, in place), copies it into the tensor, invokes, and
copies the rows it needs into the output buffer: nothing is allocated per call except numpy's
view objects. Rows are independent in every model we ship (dense layers), so the unused tail of
a padded bucket is harmless. Bigger inputs are processed ``max_batch`` rows at a time.

``run`` returns a *view* of the runner's output buffer, valid until the next call; copy it to
keep it. ``run_async`` runs large batches in a worker thread (the interpreter releases the GIL
while it computes) so the asyncio scan loop never stalls; a per-runner lock serialises calls
because an interpreter is not thread-safe.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.histogram import Histogram
from edgeos.inference.errors import BackendUnavailable, ModelRejected

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "Runner",
    "available_backends",
    "interpreter_class",
]

F32 = npt.NDArray[np.float32]

#: Interpreter packages we know, in order of preference.
BACKENDS: tuple[str, ...] = ("ai_edge_litert", "tflite_runtime")


def interpreter_class(backend: str) -> Any:
    """The ``Interpreter`` class of a backend; raises :class:`BackendUnavailable`."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown TFLite backend {backend!r} (known: {BACKENDS})")
    try:
        module = importlib.import_module(f"{backend}.interpreter")
    except ImportError as exc:
        raise BackendUnavailable(f"TFLite backend {backend!r} is not installed: {exc}") from exc
    return module.Interpreter


def available_backends() -> tuple[str, ...]:
    """Backends that import in this process, in order of preference."""
    found = []
    for name in BACKENDS:
        try:
            interpreter_class(name)
        except BackendUnavailable:
            continue
        found.append(name)
    return tuple(found)


def _choose_backend() -> str | None:
    forced = os.environ.get("EDGEOS_TFLITE_BACKEND", "").strip()
    if forced:
        return forced
    found = available_backends()
    return found[0] if found else None


#: The backend runners use unless told otherwise (``None``: no interpreter installed).
DEFAULT_BACKEND: str | None = _choose_backend()


class _Bucket:
    """One interpreter sized for ``size`` rows, with its buffers."""

    __slots__ = ("inp", "interp", "out_index", "out_view", "size", "tensor_index")

    def __init__(
        self, cls: Any, model: bytes, size: int, *, shape: tuple[int, ...], threads: int, name: str
    ) -> None:
        self.size = size
        self.interp = cls(model_content=model, num_threads=threads)
        detail = self.interp.get_input_details()[0]
        declared = tuple(int(d) for d in detail["shape"][1:])
        if declared != shape:
            # Checked before resizing: a wrong shape must be named, not fail inside a delegate.
            raise ModelRejected(name, f"input shape {declared} does not match manifest {shape}")
        self.tensor_index = int(detail["index"])
        self.interp.resize_tensor_input(self.tensor_index, [size, *shape])
        self.interp.allocate_tensors()
        self.out_index = int(self.interp.get_output_details()[0]["index"])
        # The output tensor's accessor is resolved once; calling it returns a fresh view.
        self.out_view = self.interp.tensor(self.out_index)
        self.inp: F32 = np.zeros((size, *shape), dtype=np.float32)


class Runner:
    """Batched inference over one ``.tflite`` model (see the module docstring).

    ``mean``/``std`` normalise the raw input (they broadcast over the last axis); ``name`` is
    used in errors. Raises :class:`ModelRejected` when the interpreter cannot load the model or
    its shapes do not match ``input_shape``/``output_width``.
    """

    def __init__(
        self,
        model: bytes,
        *,
        input_shape: Sequence[int],
        output_width: int,
        mean: npt.ArrayLike = 0.0,
        std: npt.ArrayLike = 1.0,
        max_batch: int = 80,
        buckets: Sequence[int] = (1, 8),
        backend: str | None = None,
        num_threads: int = 1,
        thread_threshold: int = 4096,
        name: str = "model",
    ) -> None:
        chosen = backend or DEFAULT_BACKEND
        if chosen is None:
            raise BackendUnavailable(
                "no TFLite interpreter installed: pip install ai-edge-litert (or tflite-runtime)"
            )
        cls = interpreter_class(chosen)
        self.backend = chosen
        self.name = name
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_width = int(output_width)
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.thread_threshold = thread_threshold
        self._mean = np.asarray(mean, dtype=np.float32)
        self._inv_std = (1.0 / np.asarray(std, dtype=np.float64)).astype(np.float32)
        sizes = sorted({min(int(b), self.max_batch) for b in buckets} | {self.max_batch})
        try:
            self._buckets = [
                _Bucket(cls, model, s, shape=self.input_shape, threads=num_threads, name=name)
                for s in sizes
            ]
        except (ValueError, RuntimeError) as exc:
            raise ModelRejected(name, f"the interpreter cannot load it: {exc}") from exc
        self._check_shapes()
        self._out: F32 = np.zeros((self.max_batch, self.output_width), dtype=np.float32)
        self._big_out: F32 = self._out
        self._lock = threading.Lock()
        #: Wall time of each ``run`` call (normalise + invoke + copy), seconds.
        self.latency = Histogram()
        self.calls = 0
        self.rows = 0

    def _check_shapes(self) -> None:
        b = self._buckets[-1]
        in_shape = tuple(int(d) for d in b.interp.get_input_details()[0]["shape"])
        out_shape = tuple(int(d) for d in b.interp.get_output_details()[0]["shape"])
        if in_shape[1:] != self.input_shape:
            raise ModelRejected(
                self.name, f"input shape {in_shape[1:]} does not match manifest {self.input_shape}"
            )
        width = int(np.prod(out_shape[1:])) if len(out_shape) > 1 else 1
        if width != self.output_width:
            raise ModelRejected(
                self.name, f"output width {width} does not match manifest {self.output_width}"
            )

    # ------------------------------------------------------------------ running

    def _bucket_for(self, n: int) -> _Bucket:
        for b in self._buckets:
            if b.size >= n:
                return b
        return self._buckets[-1]

    def _run_chunk(self, x: npt.NDArray[Any], out: F32) -> None:
        n = x.shape[0]
        b = self._bucket_for(n)
        rows = b.inp[:n]
        np.subtract(x, self._mean, out=rows, casting="unsafe")
        np.multiply(rows, self._inv_std, out=rows)
        interp = b.interp
        interp.set_tensor(b.tensor_index, b.inp)
        interp.invoke()
        view = b.out_view()
        out[:n] = view[:n].reshape(n, self.output_width)
        # Drop our reference at once: the interpreter refuses to invoke while views are alive.
        del view

    def run(self, x: npt.ArrayLike) -> F32:
        """Outputs ``(n, output_width)`` for raw inputs ``(n, *input_shape)``.

        Returns a view of an internal buffer, valid until the next call on this runner.
        """
        arr = np.asarray(x)
        if arr.shape[1:] != self.input_shape:
            raise ValueError(
                f"{self.name}: expected rows of shape {self.input_shape}, got {arr.shape[1:]}"
            )
        n = arr.shape[0]
        start = time.perf_counter()
        with self._lock:
            if n <= self.max_batch:
                out = self._out
                self._run_chunk(arr, out)
            else:
                if self._big_out.shape[0] < n:
                    # Rare (more rows than max_batch): grow once and keep the buffer.
                    self._big_out = np.zeros((n, self.output_width), dtype=np.float32)
                out = self._big_out
                for lo in range(0, n, self.max_batch):
                    hi = min(n, lo + self.max_batch)
                    self._run_chunk(arr[lo:hi], out[lo:hi])
            self.calls += 1
            self.rows += n
        self.latency.record(time.perf_counter() - start)
        return out[:n]

    async def run_async(self, x: npt.ArrayLike) -> F32:
        """Like :meth:`run`, but large batches go to a worker thread; returns a copy."""
        arr = np.asarray(x)
        if arr.shape[0] >= self.thread_threshold:
            return await asyncio.to_thread(lambda: self.run(arr).copy())
        return self.run(arr).copy()

    def invoke_raw(self, batch: int | None = None) -> None:
        """Invoke the interpreter alone on its current input (for benchmarks)."""
        self._bucket_for(batch or self.max_batch).interp.invoke()

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "calls": self.calls,
            "rows": self.rows,
            "latency": self.latency.summary_ms(),
        }
