"""The method registry: every row of `make eval` (and the `make bench` scripts that time a method's steps) comes from
here. A method joins the benchmark by adding one file to ``miniworld/rows/`` that registers its rows:

    from ..registry import Personalised, register

    @register("ti", "Textual Inversion", order=40, gated=True, baseline=True, bench=("bench/bench_training.py",))
    def personalise(bench, heldout, index):      # bench: miniworld.benchmark.Benchmark, heldout: world.HeldoutSubject
        ...                                  # train from heldout.references through the pack's nodes (bench.call)
        return Personalised(model, clip, prompts, seconds, nbytes)   # what to generate with

Nothing else changes: ``scripts/eval_methods.py`` lists, runs, gates and compares the registered rows, and
``bench/run_all.py`` runs every registered ``bench`` script once. Importing this module does no work; the rows are
loaded on first use.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

_ROWS: dict[str, "MethodRow"] = {}
_LOADED = False


@dataclass
class Personalised:
    """What a row hands to generation: the MODEL/CLIP to sample with, a prompt per scene, an optional conditioning
    transform (HiFi), an optional ``sampler`` (ProFusion) and the personalisation's cost; or, for a bound that is not
    generated (the world's own renders), the ``images`` themselves.

    ``sampler(prompt) -> SAMPLER``: the row samples each prompt with stock SamplerCustom and this SAMPLER (e.g. the
    Fusion Sampler node's output, built for that prompt) on the benchmark's SIGMAS (BasicScheduler with the
    benchmark's scheduler and steps), seeds and cfg, instead of KSampler with the benchmark's sampler; for a stock
    ``ddim`` SAMPLER both paths give the same images (tests/test_mini_benchmark.py)."""
    model: object = None
    clip: object = None
    prompts: list[str] | None = None
    seconds: float = 0.0
    nbytes: int = 0
    transform: Callable | None = None
    images: object = None
    sampler: Callable | None = None


@dataclass(frozen=True)
class MethodRow:
    key: str                 # the name on the command line (--methods) and in --json
    title: str               # the table's row title
    personalise: Callable    # (benchmark, heldout, index) -> Personalised; index: the subject's seed offset
    order: int = 100         # table position (ascending)
    tuned: bool = True       # tunes (weights or embeddings) on the subject at test time: "tuned at test time"
    personalises: bool = True  # a personalisation method: sees the subject's references, reports its seconds and
    #                            bytes per subject, gets paired differences (False: the bounds and the words-only
    #                            baseline). A tuning-free encoder row is ``personalises=True, tuned=False``.
    gated: bool = False      # a method at its defaults: `make eval` and CI fail when it is not above the floor
    floor: bool = False      # the floor the gated rows must beat (base model, class word only)
    baseline: bool = False   # a row methods claim to beat: every tuned row gets a paired difference against it
    default: bool = True     # in `make eval`'s rows without --methods (False: opt-in diagnostics)
    bench: tuple[str, ...] = ()  # `make bench` scripts (repository paths) timing this method's steps
    protocols: tuple[str, ...] = ("multi", "one")  # the protocols it runs under (BenchConfig.method_keys drops it
    #                            from the others' rows, listed or not); ("one",): a one-image method such as ProFusion,
    #                            which reads one view whatever it is handed


def register(key: str, title: str, **flags) -> Callable:
    """Decorator: register ``personalise`` as the row ``key``. A key registers once."""
    def decorate(personalise: Callable) -> Callable:
        if key in _ROWS:
            raise ValueError(f"benchmark row {key!r} is registered twice")
        _ROWS[key] = MethodRow(key, title, personalise, **flags)
        return personalise
    return decorate


def _load() -> None:
    """Import every module of the ``rows`` package next to this one (each registers its rows)."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module(f"{__name__.rpartition('.')[0]}.rows")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED = True


def rows() -> tuple[MethodRow, ...]:
    """Every registered row, in table order."""
    _load()
    return tuple(sorted(_ROWS.values(), key=lambda r: (r.order, r.key)))


def get(key: str) -> MethodRow:
    _load()
    if key not in _ROWS:
        raise ValueError(f"unknown benchmark row {key!r}; known: {', '.join(r.key for r in rows())}")
    return _ROWS[key]


def keys(**flags) -> tuple[str, ...]:
    """Keys of the rows whose flags equal ``flags`` (e.g. ``keys(gated=True)``), in table order."""
    return tuple(r.key for r in rows() if all(getattr(r, k) == v for k, v in flags.items()))


def runs_under(key: str, protocol: str) -> bool:
    """Whether row ``key`` runs under ``protocol`` ("multi", "one" or "k of n", which counts as multi)."""
    return ("one" if protocol == "one" else "multi") in get(key).protocols


def bench_scripts() -> tuple[str, ...]:
    """The `make bench` scripts of all rows, each once, in table order."""
    return tuple(dict.fromkeys(s for r in rows() for s in r.bench))
