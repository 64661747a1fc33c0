"""Loading controller: cached chunk KV placed layer by layer, behind the blend's compute.

CacheBlend's §5 idea. Before layer ``l`` runs, the fused buffers need layer ``l`` of every
cached span: converted to the model's dtype, copied to its device, keys rotated to their
positions. ``LayerFeed`` does that work for layer ``l + 1`` on a background thread (and on a
side CUDA stream) while the main thread computes layer ``l``, so only layer 0's placement is
on the critical path. ``LoadingController`` measures how long a layer takes to place and to
compute, and picks the recompute ratio whose extra compute still hides under loading.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from ragkv.config import BlendConfig
from ragkv.engine.kernels import interpreting
from ragkv.engine.kv import ChunkKV


class Workspace:
    """Grow-only buffers reused from one prefill to the next.

    Each fused buffer is ``[layers, kv_heads, T, head_dim]``, tens of MB for a few thousand
    tokens: allocators hand memory that large straight back to the OS, so every prefill would
    fault it in again page by page, which on a CPU costs about as much as a layer of compute.
    For callers that are done with a prefill's fused KV before the next one starts (the vLLM
    worker copies it into its paged cache), or that lend it out through a
    :class:`WorkspacePool`; the result's tensors are views into these buffers.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """An uninitialised ``shape`` tensor backed by the buffer ``name``."""
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def idle(self) -> bool:
        """Whether nothing outside this workspace references its buffers (no result's views
        are alive). False where torch cannot tell."""
        return _LONE is not None and all(_storage_refs(b) == _LONE for b in self._bufs.values())


def _storage_refs(t: torch.Tensor) -> int:
    """References to ``t``'s memory: tensors and views on it, numpy arrays, storages."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _lone_refs() -> int | None:
    """What :func:`_storage_refs` reads for a tensor nothing else references; None where this
    torch has no use counts (pooling is then off)."""
    try:
        return _storage_refs(torch.empty(1))
    except (AttributeError, RuntimeError, TypeError):
        return None


_LONE = _lone_refs()


class WorkspacePool:
    """Workspaces lent to one prefill at a time, for an engine that hands the fused KV out with
    the answer (the transformers engine decodes and scores from it).

    A workspace is free again once nothing outside it references its buffers, read from their
    storages' use counts: a result kept for decoding keeps its workspace busy, and nothing is
    returned by hand. Only on the CPU, where fresh buffers of tens of MB are faulted in page by
    page on every prefill (30-200 ms of a ~700 ms blend of 2k tokens at two threads, against
    about 11 ms in a reused workspace); CUDA's caching allocator already reuses memory. At most
    ``size`` workspaces are kept, each as large as the longest prompt it served; when all are
    busy a prefill gets fresh buffers.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._pool: list[Workspace] = []
        self._lent: set[Workspace] = set()
        self._lock = threading.Lock()

    @contextmanager
    def lease(self, device: torch.device) -> Iterator[Workspace | None]:
        """A free workspace for the duration of the block (None: use fresh buffers). Results
        made in it stay valid as long as they are referenced."""
        ws = None
        if device.type == "cpu" and _LONE is not None:
            with self._lock:
                ws = next((w for w in self._pool if w not in self._lent and w.idle()), None)
                if ws is None and len(self._pool) < self.size:
                    ws = Workspace()
                    self._pool.append(ws)
                if ws is not None:
                    self._lent.add(ws)
        try:
            yield ws
        finally:
            if ws is not None:
                with self._lock:
                    self._lent.discard(ws)

    def clear(self) -> None:
        """Let go of the workspaces (results still referenced keep their memory)."""
        with self._lock:
            self._pool = [w for w in self._pool if w in self._lent]


def _fresh(name: str, shape: tuple[int, ...], dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class LayerFeed:
    """Fused buffers ``k_pre`` (pre-RoPE keys), ``k_buf`` (rotated keys) and ``v_buf``, all
    ``[layers, kv_heads, T, head_dim]``, filled from ``cached`` spans ``(start, ChunkKV)``.

    ``pipelined=False`` fills every layer now (one RoPE launch for the whole buffer);
    ``True`` places layer by layer on a background thread, ``wait(l)`` returning once layer
    ``l`` is in place; ``None`` (default) pipelines only spans that must cross devices. The
    buffers come from ``workspace`` when one is given (see :class:`Workspace`).
    """

    def __init__(self, runner, cached: list[tuple[int, ChunkKV]], T: int, cos: torch.Tensor,
                 sin: torch.Tensor, pipelined: bool | None = None,
                 workspace: Workspace | None = None) -> None:
        dev, dt = runner.device, runner.dtype
        L, H, D = runner.n_layers, runner.kv_heads, runner.head_dim
        self.ops, self.cached, self.cos, self.sin = runner.ops, cached, cos, sin
        take = workspace.take if workspace is not None else _fresh
        self.k_pre = take("k_pre", (L, H, T, D), dt, dev)
        self.v_buf = take("v", (L, H, T, D), dt, dev)
        k_buf = take("k", (L, H, T, D), dt, dev)
        # Only positions no span covers need zeros; the rest is overwritten by placement.
        covered = torch.zeros(T, dtype=torch.bool)
        for start, kv in cached:
            covered[start:start + kv.n_tokens] = True
        gaps = (~covered).nonzero().flatten().to(dev)
        self.k_pre.index_fill_(2, gaps, 0.0)
        self.v_buf.index_fill_(2, gaps, 0.0)
        self.place_s = [0.0] * L
        self.error: BaseException | None = None
        self._ready = [threading.Event() for _ in range(L)]
        # Pipelining pays only when spans cross devices (host memory to GPU: measured 82 -> 70
        # ms TTFT on an 8B shape). With KV already on the model's device the side stream and
        # the extra thread cost more than they hide (60 -> 71 ms), and on the CPU it was a wash.
        if pipelined is None:
            pipelined = any(kv.k.device != dev for _, kv in cached)
        # Triton's interpreter (tests) patches the language module while a kernel runs, so two
        # threads cannot interpret kernels at once.
        if self.ops.name == "triton" and interpreting():
            pipelined = False
        if not pipelined or L == 1:
            t = time.perf_counter()
            self._place(slice(None))
            self.k_buf = self.ops.rope(self.k_pre, cos, sin, out=k_buf)
            self.place_s = [(time.perf_counter() - t) / L] * L
            for e in self._ready:
                e.set()
            self._thread = None
            return
        self.k_buf = k_buf
        self._stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self._events: list[torch.cuda.Event | None] = [None] * L
        self._starts: list[torch.cuda.Event | None] = [None] * L
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(dev))  # the fills above
        self._thread = threading.Thread(target=self._run, name="ragkv-layer-feed", daemon=True)
        self._thread.start()

    def _place(self, layers) -> None:
        for start, kv in self.cached:
            n = kv.n_tokens
            self.k_pre[layers, :, start:start + n].copy_(kv.k[layers], non_blocking=True)
            self.v_buf[layers, :, start:start + n].copy_(kv.v[layers], non_blocking=True)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                for layer in range(len(self._ready)):
                    t = time.perf_counter()
                    if self._stream is not None:
                        with torch.cuda.stream(self._stream):
                            start, ev = (torch.cuda.Event(enable_timing=True) for _ in "ab")
                            start.record(self._stream)
                            self._layer(layer)
                            ev.record(self._stream)
                            self._starts[layer], self._events[layer] = start, ev
                    else:
                        self._layer(layer)
                    self.place_s[layer] = time.perf_counter() - t
                    self._ready[layer].set()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread in wait()
            self.error = exc
            for e in self._ready:
                e.set()

    def _layer(self, layer: int) -> None:
        self._place(layer)
        self.ops.rope(self.k_pre[layer], self.cos, self.sin, out=self.k_buf[layer])

    def wait(self, layer: int) -> None:
        self._ready[layer].wait()
        if self.error is not None:
            raise RuntimeError("placing cached KV failed") from self.error
        ev = self._events[layer] if self._thread is not None else None
        if ev is not None:
            torch.cuda.current_stream(self.k_pre.device).wait_event(ev)

    def close(self) -> list[float]:
        """Join the loader; seconds each layer's placement took."""
        if self._thread is None:
            return self.place_s
        self._thread.join()
        if self._stream is not None:  # device time of the side stream's work
            self._events[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self._starts, self._events,
                                                          strict=True)]
        return self.place_s


class LayerClock:
    """Per-layer compute time of the main thread (CUDA events on a GPU, so no sync in the
    loop; read once at the end)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.lap()

    def lap(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        m = self.marks
        if self.cuda:
            m[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(m, m[1:], strict=False)]
        return [b - a for a, b in zip(m, m[1:], strict=False)]


@dataclass
class LoadingController:
    """Chooses the recompute ratio so that recompute hides under loading (paper §5).

    Measures, per layer and per chunk token, how long placing cached KV takes (``load``) and how
    long computing every chunk token takes (``compute``); both are running averages. The ratio
    r is the largest whose recompute fits in the load time, ``r = load / compute``, never below
    ``floor`` (quality) nor above 1. With no measurements yet it answers ``floor``.
    """

    smoothing: float = 0.3
    load_s_per_token: float | None = None
    compute_s_per_token: float | None = None

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe(self, *, chunk_tokens: int, place_s: list[float],
                layer_s: list[float], computed: list[int]) -> None:
        """One prefill's measurements: per-layer placement and compute times and how many
        tokens each layer computed."""
        if chunk_tokens <= 0 or not place_s:
            return
        load = sum(place_s) / len(place_s) / chunk_tokens
        self.load_s_per_token = self._ewma(self.load_s_per_token, load)
        rates = [t / n for t, n in zip(layer_s, computed, strict=True) if n > 0]
        if rates:
            rates.sort()
            self.compute_s_per_token = self._ewma(self.compute_s_per_token,
                                                  rates[len(rates) // 2])

    def choose_ratio(self, floor: float) -> float:
        if not self.load_s_per_token or not self.compute_s_per_token:
            return floor
        return float(min(1.0, max(floor, self.load_s_per_token / self.compute_s_per_token)))

    def resolve(self, blend: BlendConfig) -> BlendConfig:
        """``blend`` with ``ratio="auto"`` replaced by this controller's choice (a set ratio
        wins): what an engine fuses with, and what the trace and the request carry."""
        if blend.ratio != "auto":
            return blend
        return replace(blend, ratio=self.choose_ratio(blend.min_ratio))
