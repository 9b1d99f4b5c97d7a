"""Search spaces for `cube tune`: YAML files a person can read, checked before any trial runs.

    # tune_spaces/nca.yaml
    cube.steps:      {distribution: int, low: 8, high: 20}
    cube.fire_rate:  {distribution: uniform, low: 0.5, high: 1.0}
    optim.lr:        {distribution: loguniform, low: 3.0e-4, high: 3.0e-3}
    cube.hidden:     {distribution: choice, values: [16, 32, 64]}

Keys are the dotted names `--set` takes; a value a trial draws is applied exactly like
`--set key=value` and then validated by the config's own rules, so a trial whose combination is
invalid (say steps < depth - 1) fails with that rule's message and is recorded, while the
sweep goes on. Bad files fail at once, naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from cube.config import coerce, from_dict, resolve_key

Distribution = Literal["uniform", "loguniform", "int", "choice"]
SPEC_KEYS = {"uniform": {"low", "high"}, "loguniform": {"low", "high"}, "int": {"low", "high", "step"},
             "choice": {"values"}}


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key, as for --set
    distribution: Distribution
    low: float | None = None
    high: float | None = None
    step: int = 1
    values: tuple[Any, ...] = ()

    def to_tune(self) -> Any:
        """The Ray Tune domain (OptunaSearch converts it to an Optuna distribution)."""
        from ray import tune

        if self.distribution == "uniform":
            return tune.uniform(self.low, self.high)
        if self.distribution == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.distribution == "int":
            return tune.qrandint(int(self.low), int(self.high), self.step)  # both bounds inclusive
        return tune.choice(list(self.values))

    def to_optuna(self) -> Any:
        """The Optuna distribution, for parameter importances computed from a results table."""
        import optuna.distributions as d

        if self.distribution in ("uniform", "loguniform"):
            return d.FloatDistribution(self.low, self.high, log=self.distribution == "loguniform")
        if self.distribution == "int":
            return d.IntDistribution(int(self.low), int(self.high), step=self.step)
        return d.CategoricalDistribution(list(self.values))


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(f"{where} must be a number, got {value!r}")
    return float(value)


def _check_type(where: str, config_cls: type, key: str, param: Param) -> None:
    """Each value the parameter can take must be valid for the config key's type."""
    tp, _ = resolve_key(config_cls, key)
    if param.distribution in ("uniform", "loguniform") and tp is int:
        raise SpaceError(f"{where}: {key} is an integer; use distribution: int")
    samples = list(param.values) if param.distribution == "choice" else [param.low, param.high]
    for value in samples:
        try:
            coerce(int(value) if param.distribution == "int" else value, tp, key)
        except ValueError as e:
            raise SpaceError(f"{where}: {e}") from None


def parse_param(path: Path, key: str, spec: Any, config_cls: type) -> Param:
    where = f"{path}: {key}"
    try:
        resolve_key(config_cls, key)
    except ValueError as e:
        raise SpaceError(f"{path}: {e}") from None
    if not isinstance(spec, dict) or "distribution" not in spec:
        raise SpaceError(f"{where} must be a mapping with a 'distribution' ({', '.join(SPEC_KEYS)})")
    dist = spec["distribution"]
    if dist not in SPEC_KEYS:
        raise SpaceError(f"{where}: unknown distribution {dist!r}; use one of {list(SPEC_KEYS)}")
    unknown = set(spec) - SPEC_KEYS[dist] - {"distribution"}
    missing = SPEC_KEYS[dist] - {"step"} - set(spec)
    if unknown or missing:
        raise SpaceError(
            f"{where}: {dist} takes {sorted(SPEC_KEYS[dist])}"
            + (f"; unknown {sorted(unknown)}" if unknown else "")
            + (f"; missing {sorted(missing)}" if missing else "")
        )
    if dist == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: values must be a non-empty list")
        param = Param(key, dist, values=tuple(values))
    else:
        low, high = _number(f"{where}.low", spec["low"]), _number(f"{where}.high", spec["high"])
        if low >= high:
            raise SpaceError(f"{where}: low ({low:g}) must be below high ({high:g})")
        if dist == "loguniform" and low <= 0:
            raise SpaceError(f"{where}: loguniform needs low > 0, got {low:g}")
        step = spec.get("step", 1)
        if dist == "int" and (low != int(low) or high != int(high) or not isinstance(step, int) or step < 1):
            raise SpaceError(f"{where}: int needs integer low/high and an integer step >= 1")
        param = Param(key, dist, low, high, step=step)
    _check_type(where, config_cls, key, param)
    return param


def load_space(paths: list[Path], config_cls: type) -> list[Param]:
    """The parameters of one or more space files, in file order; a key may appear only once.

    Raises:
        SpaceError: a missing file, bad YAML, an unknown key or distribution, bad bounds, a
            value the config key cannot take, or a key repeated across files.
    """
    params: dict[str, Param] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise SpaceError(f"search space {path} does not exist (see tune_spaces/)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise SpaceError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict) or not data:
            raise SpaceError(f"{path} must map dotted config keys to distributions")
        for key, spec in data.items():
            if key in params:
                raise SpaceError(f"{path}: {key} is already searched in another space file")
            params[key] = parse_param(path, str(key), spec, config_cls)
    return list(params.values())


def plain(value: Any) -> Any:
    """numpy scalars (as some searchers return them) → Python values the config accepts."""
    return value.item() if hasattr(value, "item") else value


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested config dict `base` with dotted `params` set."""
    import copy

    out = copy.deepcopy(base)
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = plain(value)
    return out


def trial_config(config_cls: type, base: dict[str, Any], params: dict[str, Any]) -> Any:
    """The validated config of one trial.

    Raises:
        ValueError: the drawn combination breaks one of the config's own rules.
    """
    return from_dict(config_cls, apply_params(base, params))
