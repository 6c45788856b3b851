"""The search space, in one place: what Ray Tune + Optuna search, and over which ranges.

    space = build_space(cfg)          # {name: Param}, the default + cfg.tune.extra + cfg.tune.space
    print(format_space(cfg))          # what ``dssn tune --print-space`` shows
    trial_cfg = apply_params(cfg, {"temperature": 0.2, ...})   # the Config one trial trains

A parameter is named by its config field (``temperature``) or full dotted path
(``dssn.temperature``); both resolve to the same config path through
:func:`dssn.config.resolve_key`. A spec is one of::

    {"loguniform": [low, high]}    {"uniform": [low, high]}    {"int": [low, high]}  (inclusive)
    {"choice": [a, b, ...]}        a plain value (fixed: not searched)    null (dropped)

``{"loguniform": [0.25, 4.0], "relative": true}`` scales the range by the config's own value
(used for ``lr``, whose scale depends on the dataset).

Coupled knobs. ``topk_ratio`` acts only with ``dssn.selection=topk`` and ``temperature`` only with
``dssn.consistency=infonce``. So when one of them is searched and the knob it needs is not,
every trial gets that knob fixed (``selection=topk``, ``consistency=infonce``): the default space
therefore searches DSSN with top-k selection and InfoNCE consistency, the knobs this project
adds. To search the reference method (``dssn`` selection, MSE consistency) drop the two from the
space (``tune.space: {topk_ratio: null, temperature: null}``). When ``selection`` or
``consistency`` is itself searched (``tune.extra``), nothing is fixed: the coupled parameter
then matters only in the trials that drew the matching choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dssn.config import CHOICES, Config, ConfigError, get_path, resolve_key, set_values

KINDS = ("loguniform", "uniform", "int", "choice")

# The default space: the method's loss weights and the two knobs this project adds.
DEFAULT_SPACE: dict[str, Any] = {
    "temperature": {"loguniform": [0.03, 1.0]},  # InfoNCE temperature (default 0.1)
    "topk_ratio": {"uniform": [0.1, 0.9]},  # top-k selection: fraction kept (default 0.5)
    "w_strong": {"uniform": [0.05, 1.0]},  # strong-view loss weight (reference 0.25)
    "w_fp": {"uniform": [0.05, 1.0]},  # feature-perturbation loss weight (reference 0.25)
    "w_consistency": {"loguniform": [0.001, 0.1]},  # Siamese consistency (reference 0.01)
}

# Optional parameters, added by name through ``tune.extra``.
EXTRA_SPACE: dict[str, Any] = {
    "lr": {"loguniform": [0.25, 4.0], "relative": True},  # x the config's lr
    "ema": {"uniform": [0.99, 0.999]},  # teacher EMA rate (reference 0.996)
    "selection": {"choice": list(CHOICES["dssn.selection"])},
    "consistency": {"choice": list(CHOICES["dssn.consistency"])},
}

# searched parameter -> (the knob it needs, the value that makes it act)
COUPLED: dict[str, tuple[str, Any]] = {
    "dssn.topk_ratio": ("dssn.selection", "topk"),
    "dssn.temperature": ("dssn.consistency", "infonce"),
}


@dataclass(frozen=True)
class Param:
    """One searched parameter: its config path and its distribution."""

    name: str  # the name trials and tables use (field name when unique, else dotted path)
    path: str  # dotted config path
    kind: str  # loguniform | uniform | int | choice
    values: tuple  # (low, high) for ranges, the options for choice

    def describe(self) -> str:
        if self.kind == "choice":
            return "choice " + "{" + ", ".join(str(v) for v in self.values) + "}"
        low, high = self.values
        return f"{self.kind} [{low:g}, {high:g}]"

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a draw this parameter can make."""
        if self.kind == "choice":
            return value in self.values
        low, high = self.values
        # small tolerance: Tune/Optuna return floats that may round at the bounds
        return low - 1e-12 * abs(low) <= value <= high + 1e-12 * abs(high)


def display_name(path: str) -> str:
    """The field name when it alone resolves to ``path``, else the dotted path."""
    leaf = path.rsplit(".", 1)[-1]
    try:
        return leaf if resolve_key(leaf) == path else path
    except ConfigError:
        return path


def parse_param(key: str, spec: Any, cfg: Config, where: str) -> Param | None:
    """A Param from one ``name: spec`` entry; None for a fixed value or ``null``.

    ``where`` names the entry in errors (``tune.space.temperature``)."""
    path = resolve_key(key)
    if spec is None or not isinstance(spec, dict):
        return None
    kinds = [k for k in spec if k in KINDS]
    unknown = [k for k in spec if k not in KINDS and k != "relative"]
    if len(kinds) != 1 or unknown:
        raise ConfigError(
            f"{where}: a spec needs exactly one of {list(KINDS)} (and optionally "
            f"'relative'), got {sorted(spec)}"
        )
    kind = kinds[0]
    values = spec[kind]
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{where}.{kind}: expected a list, got {values!r}")
    if kind == "choice":
        allowed = CHOICES.get(path)
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise ConfigError(f"{where}: {bad} not in {list(allowed)}")
        return Param(display_name(path), path, kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{where}.{kind}: expected [low, high], got {values!r}")
    low, high = values
    if spec.get("relative"):
        base = get_path(cfg, path)
        low, high = low * base, high * base
    if kind == "int":
        low, high = int(low), int(high)
    else:
        low, high = float(low), float(high)
    if not low < high:
        raise ConfigError(f"{where}.{kind}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: low must be positive, got {low}")
    return Param(display_name(path), path, kind, (low, high))


def space_specs(cfg: Config) -> dict[str, tuple[Any, str]]:
    """Default + ``tune.extra`` + ``tune.space`` as {config path: (spec, where it came from)}
    (later entries win)."""
    specs = {resolve_key(k): (v, f"default space {k}") for k, v in DEFAULT_SPACE.items()}
    for name in cfg.tune.extra:
        if name not in EXTRA_SPACE:
            raise ConfigError(
                f"tune.extra: unknown parameter {name!r}; choose from {sorted(EXTRA_SPACE)}"
            )
        specs[resolve_key(name)] = (EXTRA_SPACE[name], f"tune.extra {name}")
    for key, spec in cfg.tune.space.items():
        try:
            path = resolve_key(str(key))
        except ConfigError as e:
            raise ConfigError(f"tune.space.{key}: {e}") from e
        specs[path] = (spec, f"tune.space.{key}")
    return specs


def build_space(cfg: Config) -> dict[str, Param]:
    """The searched parameters, by display name."""
    specs = space_specs(cfg).items()
    params = (parse_param(path, spec, cfg, where) for path, (spec, where) in specs)
    return {p.name: p for p in params if p is not None}


def fixed_values(cfg: Config) -> dict[str, tuple[Any, str]]:
    """Values every trial gets: {config path: (value, why)}."""
    specs = space_specs(cfg)
    space = build_space(cfg)
    paths = {p.path for p in space.values()}
    fixed: dict[str, tuple[Any, str]] = {}
    for path, (spec, _) in specs.items():
        if spec is not None and not isinstance(spec, dict):
            fixed[path] = (spec, "tune.space")
    for path, (knob, value) in COUPLED.items():
        if path in paths and knob not in paths and knob not in fixed:
            fixed[knob] = (value, f"{display_name(path)} is searched")
    fixed["train.epochs"] = (max_epochs(cfg), "tune.max_epochs")
    return fixed


def max_epochs(cfg: Config) -> int:
    """Epochs of a trial that ASHA never stops: ``tune.max_epochs`` or ``train.epochs``."""
    epochs = cfg.tune.max_epochs or cfg.train.epochs
    if epochs < 1:
        raise ConfigError(f"tune.max_epochs must be positive, got {epochs}")
    return epochs


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """The Config one trial trains: the fixed values, then the trial's draws."""
    space = build_space(cfg)
    unknown = [k for k in params if k not in space]
    if unknown:
        raise ConfigError(f"trial parameters {unknown} are not in the search space {list(space)}")
    values = {path: value for path, (value, _) in fixed_values(cfg).items()}
    values.update({space[k].path: _plain(v) for k, v in params.items()})
    return set_values(cfg, values, where="trial parameters")


def _plain(value: Any) -> Any:
    """numpy scalars (Optuna draws) as Python numbers, so the config type checks accept them."""
    return value.item() if hasattr(value, "item") else value


def to_tune(space: dict[str, Param]) -> dict[str, Any]:
    """The Ray Tune param_space for ``space`` (OptunaSearch converts it to distributions)."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.kind == "loguniform":
            out[name] = tune.loguniform(*p.values)
        elif p.kind == "uniform":
            out[name] = tune.uniform(*p.values)
        elif p.kind == "int":
            out[name] = tune.randint(p.values[0], p.values[1] + 1)  # Tune's upper is exclusive
        else:
            out[name] = tune.choice(list(p.values))
    return out


def to_optuna(space: dict[str, Param]) -> dict[str, Any]:
    """Optuna distributions for ``space`` (used to rebuild a study for importances)."""
    import optuna

    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.kind == "choice":
            out[name] = optuna.distributions.CategoricalDistribution(list(p.values))
        elif p.kind == "int":
            out[name] = optuna.distributions.IntDistribution(*p.values)
        else:
            out[name] = optuna.distributions.FloatDistribution(
                *p.values, log=p.kind == "loguniform"
            )
    return out


def space_to_dict(space: dict[str, Param]) -> dict[str, Any]:
    """JSON-ready form (saved with every search as ``search.json``)."""
    return {n: {"path": p.path, "kind": p.kind, "values": list(p.values)} for n, p in space.items()}


def space_from_dict(data: dict[str, Any]) -> dict[str, Param]:
    return {n: Param(n, d["path"], d["kind"], tuple(d["values"])) for n, d in data.items()}


def format_space(cfg: Config) -> str:
    """The search space as printed by ``dssn tune --print-space``."""
    space = build_space(cfg)
    t = cfg.tune
    lines = [f"search space: {len(space)} parameters (Optuna TPE, seed {t.seed})"]
    width = max((len(n) for n in space), default=4)
    pwidth = max((len(p.path) for p in space.values()), default=4)
    for name, p in space.items():
        lines.append(f"  {name:<{width}}  {p.path:<{pwidth}}  {p.describe()}")
    lines.append("fixed in every trial:")
    for path, (value, why) in fixed_values(cfg).items():
        lines.append(f"  {path} = {value}  ({why})")
    epochs = max_epochs(cfg)
    if t.asha:
        grace = asha_grace(cfg)
        rungs = asha_rungs(epochs, grace, t.reduction_factor)
        raised = "" if grace == t.grace_period else f" (past dssn.burn_in_epochs {grace - 1})"
        lines.append(
            f"ASHA on {t.metric} (max): stops at epochs {rungs} unless in the top "
            f"1/{t.reduction_factor}; max {epochs} epochs, grace {grace}{raised}"
        )
    else:
        lines.append(f"no early stopping: every trial trains {epochs} epochs")
    return "\n".join(lines)


def asha_grace(cfg: Config) -> int:
    """ASHA's grace period in epochs: ``tune.grace_period``, raised past a labeled-only burn-in
    (``dssn.burn_in_epochs``). During the burn-in the searched DSSN terms do nothing, so a rung
    there would stop trials on their lr and EMA rate alone."""
    burn_in = 0 if cfg.method == "supervised" else cfg.dssn.burn_in_epochs
    return max(cfg.tune.grace_period, burn_in + 1)


def asha_rungs(max_t: int, grace: int, reduction_factor: float) -> list[int]:
    """The epochs at which ASHA compares trials (grace * rf^k below max_t)."""
    if grace >= max_t:
        return []
    count = int(math.log(max_t / grace, reduction_factor) + 1e-9)
    return [
        int(grace * reduction_factor**k)
        for k in range(count + 1)
        if grace * reduction_factor**k < max_t
    ]
