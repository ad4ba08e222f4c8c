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
class Timing:
    times: dict = field(default_factory=dict)   # side -> [seconds per step]
    ratios: dict = field(default_factory=dict)  # other side -> [t_first / t_other per round]

    def median(self, side) -> float:
        return statistics.median(self.times[side])

    def ratio(self, other) -> tuple[float, float, float]:
        return quantiles(self.ratios[other])


def per_item(spec: str, n: int, what: str) -> list[int]:
    """A ``--rounds``/``--steps`` option, ``"a"`` or ``"a,b,..."`` (one per ``what``: latent size, regime) -> n ints."""
    vals = [int(p) for p in str(spec).split(",") if p]
    if len(vals) == 1:
        return vals * n
    if len(vals) < n:
        raise SystemExit(f"{spec!r}: give one value or one per {what} ({n})")
    return vals[:n]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(steps: dict, rounds: int) -> Timing:
    """Time one step of every side per round, alternating the order (A B C, C B A, A B C, ...: ABBA for two
    sides), and record per round the ratio of the first side's time to each other side's.

    ``steps`` maps side name -> callable running one complete optimisation step (the first entry is "ours").
    GC is collected before and disabled during the timed part, so a collection never lands in one side.
    """
    names = list(steps)
    first = names[0]
    res = Timing({n: [] for n in names}, {n: [] for n in names[1:]})
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            order = names if i % 2 == 0 else names[::-1]
            t = {n: _timed(steps[n]) for n in order}
            for n in names:
                res.times[n].append(t[n])
            for n in names[1:]:
                res.ratios[n].append(t[first] / t[n])
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


def count_flops_and_ops(fn) -> tuple[int, "OpCounter"]:
    """(total FLOPs - matmul/conv/attention, 1 multiply-add = 2 FLOPs -, aten op counter) of one call of ``fn``."""
    flops = FlopCounterMode(display=False, custom_mapping=_custom_flop_mapping())
    ops = OpCounter()
    with flops, ops:
        fn()
    return int(flops.get_total_flops()), ops


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

