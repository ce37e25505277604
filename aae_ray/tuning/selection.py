"""Which trial becomes the round's model, and the AUROC x latency front it is chosen from.

    chosen = choose(rows, spec)     # the best metric; with a latency budget, the best among trials within it
    on_front = front(rows, spec)    # the trials no other trial beats on both the metric and the time

Pure functions over the rows `aae_ray.tuning.runner` reads from Ray Tune (status, metric, ms_per_image,
checkpoint); the runner exports `choose`'s pick, the report draws `front`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aae_ray.tuning.runner import TrialRow
    from aae_ray.tuning.spec import TuneSpec


def usable(rows: list[TrialRow], spec: TuneSpec) -> list[TrialRow]:
    """Finished trials with a model and every objective measured."""
    timed = spec.latency is not None
    return [r for r in rows if r.status == "complete" and r.metric is not None and r.checkpoint is not None
            and (not timed or r.ms_per_image is not None)]


def _key(r: TrialRow, spec: TuneSpec) -> tuple[float, float]:
    """Larger is better on both: the metric in its direction, then the time (ties go to the faster trial)."""
    ms = r.ms_per_image if r.ms_per_image is not None else 0.0
    return (r.metric if spec.mode == "max" else -r.metric, -ms)  # type: ignore[operator]


def choose(rows: list[TrialRow], spec: TuneSpec) -> TrialRow | None:
    """The round's model: the best metric among the usable trials (within select.max_ms_per_image where a
    budget is set); None when none is usable or none meets the budget (`why_none` says which)."""
    budget = spec.select.max_ms_per_image
    pool = [r for r in usable(rows, spec) if budget is None or r.ms_per_image <= budget]  # type: ignore[operator]
    return max(pool, key=lambda r: _key(r, spec)) if pool else None


def why_none(rows: list[TrialRow], spec: TuneSpec) -> str:
    """What to tell the user when `choose` found nothing."""
    done = usable(rows, spec)
    if not done:
        return "no trial finished"
    fastest = min(done, key=lambda r: r.ms_per_image)  # type: ignore[arg-type,return-value]
    return (f"no finished trial scores within select.max_ms_per_image {spec.select.max_ms_per_image:g} ms: the "
            f"fastest, {fastest.trial_id}, takes {fastest.ms_per_image:.3g} ms/image; raise the budget "
            f"(aae-ray tune --resume --max-ms-per-image X picks again without training) or search smaller models")


def front(rows: list[TrialRow], spec: TuneSpec) -> list[TrialRow]:
    """The Pareto front of a latency search, fastest first: the usable trials no other beats on both the metric
    and the time (and ties on neither). Optuna's `study.best_trials` finds the same front over the study's
    trials; these are Tune's rows, which carry the checkpoints, and two trials that drew the same config would
    make matching the two by their params ambiguous. Empty without `latency`."""
    if spec.latency is None:
        return []
    done = usable(rows, spec)
    keys = {id(r): _key(r, spec) for r in done}

    def dominated(r: TrialRow) -> bool:
        a = keys[id(r)]
        return any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in (keys[id(o)] for o in done))

    return sorted((r for r in done if not dominated(r)), key=lambda r: r.ms_per_image)  # type: ignore[arg-type,return-value]
