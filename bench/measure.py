"""Measurement helpers: interleaved A/B timing, peak step memory, FLOP and aten-op counts.

Design follows shared/docs/performance.md section 3.2: both sides in one process on the same weights, warm-up,
interleaved pairs in ABBA order, median of the per-pair time ratios with its interquartile range (robust against
other processes on a 2-core machine), plus noise-free counters (FLOPs, aten ops) that do not depend on timing.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), linear interpolation; needs at least one value."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


@dataclass
class PairTiming:
    a: list = field(default_factory=list)      # seconds per step, side A
    b: list = field(default_factory=list)      # seconds per step, side B
    ratios: list = field(default_factory=list)  # a_i / b_i per pair

    @property
    def median_a(self) -> float:
        return statistics.median(self.a)

    @property
    def median_b(self) -> float:
        return statistics.median(self.b)

    @property
    def ratio(self) -> tuple[float, float, float]:
        return quantiles(self.ratios)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(step_a, step_b, pairs: int, warmup: int = 3) -> PairTiming:
    """Time ``pairs`` steps of each side as adjacent pairs in ABBA order (A B, B A, A B, ...).

    ``step_*`` must run one complete optimisation step and return only when its work is done (CPU: always).
    GC is collected before the timed part and disabled during it, so a collection never lands in one side.
    """
    for _ in range(warmup):
        step_a()
        step_b()
    res = PairTiming()
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(pairs):
            if i % 2 == 0:
                ta = _timed(step_a)
                tb = _timed(step_b)
            else:
                tb = _timed(step_b)
                ta = _timed(step_a)
            res.a.append(ta)
            res.b.append(tb)
            res.ratios.append(ta / tb)
    finally:
        if gc_was:
            gc.enable()
    return res


# ---------------------------------------------------------------------------------------------------------------
# Memory


def peak_step_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) through torch's CPU allocator while ``fn`` runs, relative to the
    moment it starts: the step's transient working set (saved activations, gradients, temporaries, new optimizer
    state). Read from the profiler's memory events in time order. Does not see memory that libraries allocate
    outside torch's allocator (oneDNN/MKL scratch, Python objects) nor allocator/OS overheads."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover
        return None
    return None


def rss_peak_delta_bytes(fn) -> int | None:
    """Resident-set high-water mark during ``fn`` minus the resident set just before it (Linux: resets VmHWM
    through /proc/self/clear_refs, after malloc_trim). Includes everything the process touches (allocator
    slack, library scratch), so it is an upper-level cross-check of :func:`peak_step_bytes`; None if the
    kernel does not allow the reset."""
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    hwm = _status_kb("VmHWM")
    if before is None or hwm is None:
        return None
    return max(0, hwm - before) * 1024


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and op counts


def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_flop_mapping() -> dict:
    """torch's FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash-attention ones (what
    F.scaled_dot_product_attention runs on CPU); without these the diffusers side would be under-counted."""
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_bwd
    return out


def count_flops(fn) -> int:
    """Total FLOPs (matmul/conv/attention; 1 multiply-add = 2 FLOPs) of one call of ``fn``."""
    mode = FlopCounterMode(display=False, custom_mapping=_custom_flop_mapping())
    with mode:
        fn()
    return int(mode.get_total_flops())


class OpCounter(TorchDispatchMode):
    """Counts aten ops reaching the dispatcher (≈ kernels launched), views excluded."""

    _VIEWS = {"view", "_unsafe_view", "as_strided", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
              "slice", "select", "alias", "detach", "reshape", "unflatten", "flatten", "split", "chunk",
              "unbind", "narrow", "view_as", "expand_as", "diagonal", "split_with_sizes"}

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self._VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(fn) -> OpCounter:
    mode = OpCounter()
    with mode:
        fn()
    return mode
