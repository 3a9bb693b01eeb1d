"""Typed, validated configuration: one trial (TrialConfig) and one sweep file (Sweep).

Everything is validated here, at the edge; what is validated is exactly what gets logged as MLflow
params (``TrialConfig.flat()``) and hashed into the trial key (``TrialConfig.key()``).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """The autoencoder: ``conv`` (filters per conv layer), ``dense`` (units per layer) or ``none``."""

    kind: Literal["conv", "dense", "none"] = "conv"
    filters: tuple[PositiveInt, ...] | None = None
    units: tuple[PositiveInt, ...] | None = None

    @model_validator(mode="after")
    def _fields_match_kind(self):
        if self.kind == "conv":
            if not self.filters or len(self.filters) < 3:
                raise ValueError("kind conv needs filters with at least 3 layers (two are followed by pooling)")
            if self.units is not None:
                raise ValueError("units applies to kind dense, not conv")
        elif self.kind == "dense":
            if not self.units:
                raise ValueError("kind dense needs units, e.g. [128, 64, 32]")
            if self.filters is not None:
                raise ValueError("filters applies to kind conv, not dense")
        elif self.filters is not None or self.units is not None:
            raise ValueError("kind none clusters raw pixels and takes neither filters nor units")
        return self

    def label(self) -> str:
        """Short architecture name: '64-32-16-7', 'dense-128-64-32' or 'raw'."""
        if self.kind == "conv":
            return "-".join(map(str, self.filters))
        if self.kind == "dense":
            return "dense-" + "-".join(map(str, self.units))
        return "raw"


class KMeansConfig(_Strict):
    n_init: PositiveInt = 10
    max_iter: PositiveInt = 300


class GMMConfig(_Strict):
    """``impl``: ``sklearn`` (the reference) or ``fast`` (batched EM in Keras ops, same answer)."""

    impl: Literal["sklearn", "fast"] = "sklearn"
    n_init: PositiveInt = 10
    max_iter: PositiveInt = 300
    covariance_type: Literal["full", "tied", "diag", "spherical"] = "full"


class DataConfig(_Strict):
    """``subset``: images kept per split for quick runs (None: all); ``seed``: shuffling seed."""

    subset: PositiveInt | None = None
    seed: int = Field(0, ge=0)


class TrialConfig(_Strict):
    """One trial: data -> autoencoder -> latent codes -> clusterers -> scores."""

    model: ModelConfig = ModelConfig(kind="conv", filters=(64, 32, 16, 7))
    epochs: int = Field(10, ge=0)
    batch_size: PositiveInt = 128
    learning_rate: PositiveFloat = 1e-3
    seed: int = Field(0, ge=0)
    n_clusters: int = Field(10, ge=2)
    clusterers: tuple[Literal["kmeans", "gmm"], ...] = ("kmeans", "gmm")
    kmeans: KMeansConfig = KMeansConfig()
    gmm: GMMConfig = GMMConfig()
    eval_split: Literal["test", "train", "all"] = "test"
    data: DataConfig = DataConfig()

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, values: Any):
        # Raw pixels train nothing: epochs would only make two identical baselines look different.
        if isinstance(values, dict) and isinstance(values.get("model"), dict) and values["model"].get("kind") == "none":
            values = {**values, "epochs": 0}
        return values

    @model_validator(mode="after")
    def _check(self):
        if not self.clusterers:
            raise ValueError("clusterers must name at least one of kmeans, gmm")
        if len(set(self.clusterers)) != len(self.clusterers):
            raise ValueError(f"clusterers lists a clusterer twice: {list(self.clusterers)}")
        if self.model.kind != "none" and self.epochs == 0:
            raise ValueError("epochs must be at least 1 for an autoencoder")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key params, as logged to MLflow: {'model.kind': 'conv', 'model.filters': '[64, 32, 16, 7]', ...}."""
        out = {}

        def walk(prefix, value):
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix[:-1]] = json.dumps(value) if isinstance(value, (list, tuple)) else value

        walk("", self.model_dump(mode="json", exclude_none=True))
        return out

    def key(self) -> str:
        """Stable 16-hex-digit hash of the resolved config: the identity of a trial across runs and machines."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Resources(_Strict):
    cpu: PositiveFloat = 1
    gpu: float = Field(0, ge=0)


class Trial(_Strict):
    """A named, resolved trial of a sweep."""

    name: str
    config: TrialConfig


class Sweep(_Strict):
    experiment: str = Field(min_length=1)
    data: DataConfig = DataConfig()
    defaults: dict[str, Any] = {}
    trials: tuple[dict[str, Any], ...] = Field(min_length=1)
    grid: dict[str, tuple[Any, ...]] = {}
    resources: Resources = Resources()
    max_concurrent: PositiveInt | None = None
    source: str = Field("", exclude=True)  # the file text, logged with the parent run
    path: str = Field("", exclude=True)

    def expand(self) -> list[Trial]:
        """Resolved trials (validated by :func:`load_sweep`)."""
        return [Trial(name=name, config=TrialConfig(**cfg)) for name, cfg, _ in _expand(self)]


class SpecError(Exception):
    """A sweep or trial file is invalid. ``str()`` lists every problem as 'file:line: key.path: message'."""


# ---------------------------------------------------------------- expansion


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``, recursively for mappings.

    A mapping that changes ``kind`` (``model: {kind: none}`` over a conv default) replaces the
    base mapping instead of merging into it, so that settings of another kind do not leak in.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        old = out.get(key)
        if (isinstance(old, dict) and isinstance(value, dict)
                and not ("kind" in value and value.get("kind") != old.get("kind"))):
            out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(d: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = d
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"grid key {dotted!r}: {p!r} is not a mapping")
    node[last] = value
    return d


def _suffix(dotted: str, value) -> str:
    last = dotted.rsplit(".", 1)[-1]
    if isinstance(value, (list, tuple)):
        value = ".".join(map(str, value))
    return f"{last}{value}" if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{last}-{value}"


def _expand(sweep: Sweep):
    """Yield (Trial, (trial index, grid combination)) for every resolved trial."""
    keys = list(sweep.grid)
    combos = list(itertools.product(*(sweep.grid[k] for k in keys))) if keys else [()]
    for i, entry in enumerate(sweep.trials):
        body = {k: v for k, v in entry.items() if k != "name"}
        merged = deep_merge({"data": sweep.data.model_dump()}, deep_merge(sweep.defaults, body))
        for combo in combos:
            cfg = copy.deepcopy(merged)
            for k, v in zip(keys, combo):
                _set_dotted(cfg, k, v)
            name = "-".join([str(entry.get("name"))] + [_suffix(k, v) for k, v in zip(keys, combo)])
            yield name, cfg, (i, combo)


# ---------------------------------------------------------------- YAML with locations


class _LineLoader(yaml.SafeLoader):
    pass


def _node_at(node, path, *, exact: bool = False) -> Any:
    """The YAML node at a key path: with ``exact``, None when the path is absent; else the deepest
    node found on the way."""
    for key in path:
        found = None
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            found = node.value[key]
        if found is None:
            return None if exact else node
        node = found
    return node


def _locate(root, i: int, loc: tuple):
    """The node to blame for an error at ``loc`` in resolved trial ``i``: the trial's own setting,
    else the default it inherited, else the grid key that set it, else the trial entry."""
    for base in (("trials", i), ("defaults",)):
        for cut in range(len(loc), 0, -1):  # the key itself, else its nearest parent that is set
            node = _node_at(root, base + loc[:cut], exact=True)
            if node is not None:
                return node
    dotted = ".".join(str(p) for p in loc if not isinstance(p, int))
    return _node_at(root, ("grid", dotted), exact=True) or _node_at(root, ("trials", i))


def _fmt_path(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _errors(err: ValidationError, prefix=()) -> list[tuple[tuple, str]]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        out.append((prefix + loc, e["msg"].removeprefix("Value error, ")))
    return out


def parse_yaml(text: str, where: str):
    """(data, root node) of a YAML text; a syntax error becomes a SpecError with the line."""
    try:
        root = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{where}{line}: YAML syntax error: {getattr(err, 'problem', err)}") from None
    return data, root


def load_sweep(path: str | Path) -> Sweep:
    """Read, validate and expand a sweep file; raise SpecError listing every problem with file:line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read sweep file: {err.strerror}") from None
    data, root = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: a sweep file is a mapping with experiment, defaults, trials, ...")
    problems: list[tuple[Any, str]] = []  # (yaml node, 'key.path: message')

    def report(node_path, msg, node=None):
        node = node if node is not None else _node_at(root, node_path)
        problems.append((node, f"{_fmt_path(node_path)}: {msg}"))

    try:
        sweep = Sweep(**data, source=text, path=str(path))
    except ValidationError as err:
        for loc, msg in _errors(err):
            report(loc, msg)
        sweep = None
    except TypeError as err:
        raise SpecError(f"{path}:1: {err}") from None

    trials: list[Trial] = []
    if sweep is not None:
        for k, values in sweep.grid.items():
            if not values:
                report(("grid", k), "empty list: the grid would expand to no trials")
        for i, entry in enumerate(sweep.trials):
            if not isinstance(entry.get("name"), str) or not entry.get("name"):
                report(("trials", i), "every trial needs a name (a non-empty string)")
        seen_names: dict[str, int] = {}
        seen_keys: dict[str, str] = {}
        if not problems:
            for name, cfg, (i, _combo) in _expand(sweep):
                try:
                    config = TrialConfig(**cfg)
                except ValidationError as err:
                    for loc, msg in _errors(err):
                        problems.append((_locate(root, i, loc), f"trials[{i}] ({name}): {_fmt_path(loc)}: {msg}"))
                    continue
                if name in seen_names:
                    report(("trials", i, "name"), f"duplicate trial name {name!r} (also trials[{seen_names[name]}])")
                elif config.key() in seen_keys:
                    report(("trials", i), f"trial {name!r} has the same settings as {seen_keys[config.key()]!r}")
                seen_names.setdefault(name, i)
                seen_keys.setdefault(config.key(), name)
                trials.append(Trial(name=name, config=config))
        if not problems and not trials:
            report((), "the sweep expands to no trials")
    if problems:
        lines = [f"{path}:{node.start_mark.line + 1}: {msg}" for node, msg in problems]
        raise SpecError("\n".join(lines))
    return sweep


def load_trial(path: str | Path, name: str) -> TrialConfig:
    """The resolved config of trial ``name`` of a sweep file."""
    trials = {t.name: t.config for t in load_sweep(path).expand()}
    if name not in trials:
        raise SpecError(f"{path}: no trial named {name!r}; trials are: {', '.join(trials)}")
    return trials[name]
