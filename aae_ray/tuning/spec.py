"""A tuning run's YAML file (`tune_configs/*.yaml`), validated once into a `TuneSpec`.

    metric: val_auroc            # what the searcher and ASHA optimise (on val, or the synthetic objective)
    num_samples: 8               # trials
    max_concurrent: 2            # trials at once
    resources: {cpu: 1, gpu: 0}  # per trial; gpu may be fractional (0.25 = four trials share a GPU)
    scheduler: {grace_period: 1, reduction_factor: 2}   # ASHA on the per-epoch metric
    searcher: {algorithm: tpe, n_startup_trials: 4, seed: 0}
    space:                       # AAEConfig fields to search
      latent_dim: {int: [2, 32]}
      lr: {loguniform: [1.0e-4, 3.0e-3]}
      anomaly_ratio: {choice: [0, 0.005, 0.01]}
    fixed: {epochs: 5}           # AAEConfig fields every trial shares
    latency: {batch_size: 1}     # optional: AUROC x scoring time, Optuna's multi-objective search (no ASHA)
    select: {max_ms_per_image: 2.0}   # with latency: the best metric among trials under this budget

A bad file gets one line that names the key and what is wrong (`SpecError`, a `ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aae_ray.config import AAEConfig, ConfigError, read_yaml_mapping, validate

# Set from the trial's CPUs (resources.cpu), so a trial never oversubscribes the cores it was given.
MANAGED_FIELDS = {"num_threads"}


class SpecError(ConfigError):
    """A tuning spec that cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Dimension(_Strict):
    """One searched field: exactly one of `choice`, `int` (inclusive bounds), `uniform`, `loguniform`."""

    choice: list[Any] | None = Field(None, min_length=1)
    int_: tuple[int, int] | None = Field(None, alias="int")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        kinds = [k for k in ("choice", "int_", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, int, uniform, loguniform")
        lo_hi = self.int_ or self.uniform or self.loguniform
        if lo_hi is not None and lo_hi[0] > lo_hi[1]:
            raise ValueError(f"lower bound {lo_hi[0]} is above upper bound {lo_hi[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    def extremes(self) -> list[Any]:
        """The values a trial can take at the edges (every value, for a choice): checked against AAEConfig."""
        if self.choice is not None:
            return list(self.choice)
        return list(self.int_ or self.uniform or self.loguniform)  # type: ignore[arg-type]

    def contains(self, value: Any) -> bool:
        """Whether a value (e.g. the previous round's) is one this dimension can take."""
        if self.choice is not None:
            return value in self.choice
        lo, hi = self.int_ or self.uniform or self.loguniform  # type: ignore[misc]
        return isinstance(value, int | float) and lo <= value <= hi and (self.int_ is None or value == int(value))

    def to_tune(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.int_ is not None:
            return tune.randint(self.int_[0], self.int_[1] + 1)  # Tune's upper bound is exclusive
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)  # type: ignore[misc]


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class Scheduler(_Strict):
    """ASHA: at each rung (grace_period * reduction_factor^k epochs) only the best 1/reduction_factor go on."""

    asha: bool = True
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class Searcher(_Strict):
    algorithm: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = Field(4, ge=1)  # random trials before TPE models the space (Optuna's default: 10)
    seed: int = 0


class Report(_Strict):
    # Retrain the best architecture at every anomaly_ratio of the space (the source research's Fig. 5).
    anomaly_ratio_sweep: bool = True


class Round(_Strict):
    # `aae-ray round`: beside the search, the promoted model fine-tuned on the new labels for this many epochs
    # (0: no warm-started candidate); and the confidence of the paired bootstrap interval of the AUROC
    # difference on the judging set that promotion asks to lie above zero.
    warm_start_epochs: int = Field(3, ge=0, le=1000)
    confidence: float = Field(0.95, gt=0, lt=1)
    # false: the warm-started candidate alone, no search (a quick round; the first round always searches)
    search: bool = True

    @model_validator(mode="after")
    def _has_a_candidate(self) -> Round:
        if not self.search and self.warm_start_epochs == 0:
            raise ValueError("round.search: false needs round.warm_start_epochs >= 1: there would be no candidate")
        return self


class Latency(_Strict):
    """An AUROC x latency search: each finished trial is also timed scoring on the trial's own hardware
    (aae_ray.latency: milliseconds per image, the median of `repeats` passes over `images` of the objective's
    images in calls of `batch_size`), and Optuna searches both objectives, the metric up and the time down."""

    engine: Literal["auto", "torch", "onnx"] = "auto"  # auto: what `aae-ray serve` would score the model with
    batch_size: int = Field(1, ge=1, le=4096)  # images a call: 1 is a line sending each part as it passes
    images: int = Field(64, ge=1, le=100_000)
    repeats: int = Field(3, ge=1, le=100)

    def time(self, model_dir: Path, X: Any, *, threads: int = 1, device: str = "cpu", repeats: int | None = None):
        """A model's scoring time as these settings measure it (aae_ray.latency.Timing), on up to `images` of X."""
        from aae_ray.latency import time_scoring

        return time_scoring(model_dir, X[: self.images], engine=self.engine, batch_size=self.batch_size,
                            repeats=repeats or self.repeats, threads=threads, device=device)


class Select(_Strict):
    # The round's model: the best metric among the trials that score within this many milliseconds an image
    # (None: the best metric, however slow). Needs `latency` (only then are trials timed).
    max_ms_per_image: float | None = Field(None, gt=0)


LATENCY_METRIC = "ms_per_image"  # what a timed trial reports beside the metric


class TuneSpec(_Strict):
    metric: Literal["val_auroc", "val_auprc"] = "val_auroc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1, le=100_000)
    max_concurrent: int = Field(2, ge=1, le=10_000)
    max_failures: int = Field(2, ge=0)  # retries of a trial whose worker died
    resources: Resources = Resources()
    scheduler: Scheduler = Scheduler()
    searcher: Searcher = Searcher()
    report: Report = Report()
    round: Round = Round()
    space: dict[str, Dimension] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict)
    latency: Latency | None = None
    select: Select = Select()

    @model_validator(mode="after")
    def _latency_rules(self) -> TuneSpec:
        if self.latency is not None and self.scheduler.asha:
            raise ValueError("a latency search cannot use ASHA (it stops trials on one metric): set "
                             "scheduler: {asha: false}, or leave scheduler out")
        if self.select.max_ms_per_image is not None and self.latency is None:
            raise ValueError("select.max_ms_per_image needs latency: {...}: trials are timed only in a latency search")
        return self

    @property
    def objectives(self) -> list[str]:
        """What Optuna optimises: the metric, and with `latency` the scoring time too."""
        return [self.metric] + ([LATENCY_METRIC] if self.latency is not None else [])

    @property
    def modes(self) -> list[str]:
        return [self.mode] + (["min"] if self.latency is not None else [])

    @property
    def threads_per_trial(self) -> int:
        return max(1, int(self.resources.cpu))

    def base_config(self) -> dict[str, Any]:
        return {**self.fixed, "num_threads": self.threads_per_trial}

    def param_space(self) -> dict[str, Any]:
        return {k: d.to_tune() for k, d in self.space.items()}

    def values(self, field: str) -> list[Any]:
        """Every value a field can take in this spec (a searched choice, the fixed value, or the default)."""
        if field in self.space:
            return self.space[field].extremes()
        return [self.fixed.get(field, AAEConfig.model_fields[field].default)]

    @property
    def max_epochs(self) -> int:
        return int(max(self.values("epochs")))

    def trial_config(self, params: dict[str, Any]) -> AAEConfig:
        return validate({**self.base_config(), **params}, where="trial config")


def parse_spec(values: dict[str, Any], where: str = "tune config") -> TuneSpec:
    """Validate a mapping into a TuneSpec, then check every searched and fixed field against AAEConfig.
    A latency search that says nothing of the scheduler gets none (ASHA would judge on the metric alone)."""
    if isinstance(values.get("latency"), dict) and "scheduler" not in values:
        values = {**values, "scheduler": {"asha": False}}
    try:
        spec = TuneSpec(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "spec"
        raise SpecError(f"{where}: {key}: {err['msg']}") from None
    fields = set(AAEConfig.model_fields)
    for section, keys in (("space", spec.space), ("fixed", spec.fixed)):
        for key in keys:
            if key in MANAGED_FIELDS:
                raise SpecError(f"{where}: {section}.{key}: set by resources.cpu, leave it out")
            if key not in fields:
                raise SpecError(f"{where}: {section}.{key}: not a model field (known: {', '.join(sorted(fields))})")
    both = set(spec.space) & set(spec.fixed)
    if both:
        raise SpecError(f"{where}: {', '.join(sorted(both))}: both searched (space) and fixed")
    _check_config(spec.base_config(), f"{where}: fixed.")
    for key, dim in spec.space.items():
        for value in dim.extremes():
            _check_config({**spec.base_config(), key: value}, f"{where}: space.{key} = {value!r}: ")
    return spec


def _check_config(values: dict[str, Any], prefix: str) -> None:
    try:
        validate(values, where="")
    except ConfigError as exc:
        raise SpecError(prefix + str(exc).removeprefix(": ")) from None


def default_spec_path() -> Path:
    """tune_configs/default.yaml of this checkout (the package sits beside it)."""
    return Path(__file__).resolve().parents[2] / "tune_configs" / "default.yaml"


def load_spec(path: Path, *, max_ms_per_image: float | None = None, **overrides: Any) -> TuneSpec:
    """Read a YAML spec; keyword overrides (e.g. num_samples from the command line) replace top-level keys,
    `max_ms_per_image` the latency budget of `select`."""
    values = read_yaml_mapping(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return parse_spec(with_budget(values, max_ms_per_image), where=str(path))


def with_budget(values: dict[str, Any], max_ms_per_image: float | None) -> dict[str, Any]:
    """A spec mapping whose select budget is `max_ms_per_image` (unchanged where None): choosing from a finished
    search's trials changes nothing that sampled them, so `--resume` takes a new budget too."""
    if max_ms_per_image is None:
        return values
    return {**values, "select": {**(values.get("select") or {}), "max_ms_per_image": max_ms_per_image}}
