"""Typed, validated configuration: one trial (TrialConfig) and one sweep file (Sweep).

Everything is validated here, at the edge; what is validated is exactly what gets logged as MLflow
params (``TrialConfig.flat()``) and hashed into the trial key (``TrialConfig.key()``).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator,
                      model_validator)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """The autoencoder: ``conv`` (filters per conv layer), ``dense`` (units per layer) or ``none``."""

    kind: Literal["conv", "dense", "none"] = "conv"
    filters: tuple[PositiveInt, ...] | None = None
    units: tuple[PositiveInt, ...] | None = None
    latent_activation: Literal["relu", "linear"] = "relu"  # of the last encoder layer (the code)

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
        elif self.filters is not None or self.units is not None or self.latent_activation != "relu":
            raise ValueError("kind none clusters raw pixels and takes no filters, units or latent_activation")
        return self

    def latent_dim(self) -> int:
        """Features per image the clusterers see without a manifold stage: 7 x 7 x the last conv's
        filters (two poolings), the last dense layer's units, or 784 raw pixels."""
        if self.kind == "conv":
            return 7 * 7 * self.filters[-1]
        return self.units[-1] if self.kind == "dense" else 784

    def label(self) -> str:
        """Short architecture name: '64-32-16-7', 'dense-128-64-32' (``-lin`` for a linear code) or 'raw'."""
        suffix = "-lin" if self.latent_activation == "linear" else ""
        if self.kind == "conv":
            return "-".join(map(str, self.filters)) + suffix
        if self.kind == "dense":
            return "dense-" + "-".join(map(str, self.units)) + suffix
        return "raw"


class KMeansConfig(_Strict):
    n_init: PositiveInt = 10
    max_iter: PositiveInt = 300


class GMMConfig(_Strict):
    """``impl``: ``sklearn`` (the reference) or ``fast`` (batched EM in Keras ops, same answer).
    ``components``: mixture components fitted (None: ``n_clusters``); more than ``n_clusters`` are then
    merged into ``n_clusters`` clusters by the entropy criterion of Baudry et al. (2010), without labels.
    A list: a mixture of each size is fitted and the one of lowest BIC is merged (Baudry et al.'s
    procedure: BIC chooses the components, entropy the clusters)."""

    impl: Literal["sklearn", "fast"] = "sklearn"
    n_init: PositiveInt = 10
    max_iter: PositiveInt = 300
    covariance_type: Literal["full", "tied", "diag", "spherical"] = "full"
    components: PositiveInt | tuple[PositiveInt, ...] | None = None


class ManifoldConfig(_Strict):
    """An optional stage between the encoder and the clusterers: ``umap`` (umap-learn) or ``pca``
    (scikit-learn), fitted on the codes being clustered; the clusterers run on its embedding.

    ``n_neighbors``, ``min_dist`` and ``metric`` are UMAP's; they default to 20, 0.0 and euclidean
    for ``umap`` (the N2D recipe) and are refused for the other kinds.
    """

    kind: Literal["none", "umap", "pca"] = "none"
    n_components: PositiveInt | None = None
    n_neighbors: int | None = Field(None, ge=2)
    min_dist: float | None = Field(None, ge=0.0, le=1.0)
    metric: Literal["euclidean", "manhattan", "cosine", "correlation", "chebyshev"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_kind(cls, values: Any):
        if isinstance(values, dict):
            kind = values.get("kind", "none")
            defaults = {"umap": {"n_components": 10, "n_neighbors": 20, "min_dist": 0.0, "metric": "euclidean"},
                        "pca": {"n_components": 10}}.get(kind, {})
            values = {**defaults, **values}
        return values

    @model_validator(mode="after")
    def _fields_match_kind(self):
        umap_only = [k for k in ("n_neighbors", "min_dist", "metric") if getattr(self, k) is not None]
        if self.kind == "none" and (umap_only or self.n_components is not None):
            raise ValueError("kind none has no settings (the clusterers take the codes as they are)")
        if self.kind == "pca" and umap_only:
            raise ValueError(f"{', '.join(umap_only)} apply to kind umap, not pca")
        return self


class DECConfig(_Strict):
    """DEC refinement of the encoder after training (:mod:`fmnist_cluster.dec`); ``epochs: 0`` is off.
    The paper's settings: a target update every 140 batches, stop below 0.1 % of images changing
    cluster, SGD with learning rate 0.01 and momentum 0.9 (the batch size is the trial's)."""

    epochs: int = Field(0, ge=0)
    update_interval: PositiveInt = 140
    tol: float = Field(0.001, ge=0, le=1)
    learning_rate: PositiveFloat = 0.01


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
    # the images the autoencoder trains on: ``train`` (the study's: 48,000, with 12,000 held out for
    # val_loss) or ``all`` (N2D's protocol: all 70,000, the clustered images included; nothing held out,
    # so no val_loss)
    fit_split: Literal["train", "all"] = "train"
    # the order of the training images: ``once`` (fmc's default to date: Keras' TensorFlow backend draws
    # one permutation per fit() under a fixed seed, so every epoch sees the same batches) or ``epoch``
    # (a new permutation every epoch, drawn from the seed and the epoch, as the study's Keras 2 did;
    # a resumed training then goes on exactly as an unbroken one)
    shuffle: Literal["once", "epoch"] = "once"
    manifold: ManifoldConfig = ManifoldConfig()
    # DEC: the encoder refined on the images it clusters, after training and before the manifold
    dec: DECConfig = DECConfig()
    eval_every: int = Field(0, ge=0)  # epochs between scorings of the codes during training; 0: off
    # clusterers scored every eval_every epochs; None: all of the trial's clusterers
    eval_clusterers: tuple[Literal["kmeans", "gmm"], ...] | None = None
    data: DataConfig = DataConfig()

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, values: Any):
        # Raw pixels train nothing: epochs would only make two identical baselines look different.
        if isinstance(values, dict) and isinstance(values.get("model"), dict) and values["model"].get("kind") == "none":
            values = {**values, "epochs": 0, "fit_split": "train"}
        return values

    @model_validator(mode="after")
    def _check(self):
        if not self.clusterers:
            raise ValueError("clusterers must name at least one of kmeans, gmm")
        if len(set(self.clusterers)) != len(self.clusterers):
            raise ValueError(f"clusterers lists a clusterer twice: {list(self.clusterers)}")
        if self.model.kind != "none" and self.epochs == 0:
            raise ValueError("epochs must be at least 1 for an autoencoder")
        if self.dec.epochs and self.model.kind == "none":
            raise ValueError(f"dec.epochs = {self.dec.epochs}: raw pixels have no encoder to refine")
        if self.dec.epochs and self.eval_every:
            raise ValueError("dec refines the final encoder only; eval_every (scores during training) does not "
                             "apply with it")
        if self.eval_every and self.model.kind == "none":
            raise ValueError(f"eval_every = {self.eval_every}: raw pixels train nothing to score during training")
        sizes = (self.gmm.components,) if isinstance(self.gmm.components, int) else self.gmm.components or ()
        if isinstance(self.gmm.components, tuple) and (not sizes or len(set(sizes)) != len(sizes)):
            raise ValueError(f"gmm.components {list(sizes)}: a list names each number of components once")
        if sizes and min(sizes) < self.n_clusters:
            raise ValueError(f"gmm.components = {min(sizes)} is fewer than n_clusters = {self.n_clusters}: "
                             "components are merged into clusters, never split")
        if self.eval_clusterers is not None:
            if not self.eval_every:
                raise ValueError("eval_clusterers applies only with eval_every (scores during training)")
            if not self.eval_clusterers or set(self.eval_clusterers) - set(self.clusterers):
                raise ValueError(f"eval_clusterers {list(self.eval_clusterers)} must be among clusterers "
                                 f"{list(self.clusterers)}")
        dim = self.model.latent_dim()
        if self.manifold.kind == "pca" and self.manifold.n_components > dim:
            raise ValueError(f"manifold.n_components = {self.manifold.n_components} is larger than the "
                             f"{dim} features of the codes ({self.model.label()}); PCA cannot make more")
        if self.data.subset is not None:
            n_train, n_eval = self.data.subset, self.n_eval_images()
            if n_eval < self.n_clusters:
                raise ValueError(f"data.subset = {self.data.subset} leaves {n_eval} images to cluster into "
                                 f"n_clusters = {self.n_clusters}")
            if self.model.kind != "none" and self.batch_size > n_train:
                raise ValueError(f"batch_size = {self.batch_size} is larger than the {n_train} training images "
                                 f"of data.subset = {self.data.subset}")
            if self.manifold.kind != "none" and self.manifold.n_components >= n_eval:
                raise ValueError(f"manifold.n_components = {self.manifold.n_components} needs more than "
                                 f"{n_eval} images to cluster (data.subset = {self.data.subset})")
            if self.manifold.kind == "umap" and self.manifold.n_neighbors >= n_eval:
                raise ValueError(f"manifold.n_neighbors = {self.manifold.n_neighbors} needs more than "
                                 f"{n_eval} images to cluster (data.subset = {self.data.subset})")
        return self

    def scored_during_training(self) -> tuple[str, ...]:
        """The clusterers that ``eval_every`` scores: ``eval_clusterers``, else all of ``clusterers``."""
        return self.eval_clusterers or self.clusterers

    def n_eval_images(self) -> int:
        """How many images the clusterers see (the evaluation split's size)."""
        from fmnist_cluster.data import split_sizes

        train, val, test = split_sizes(self.data.subset)
        return {"test": test, "train": train + val, "all": train + val + test}[self.eval_split]

    def training(self) -> dict[str, Any]:
        """What decides the trained weights: trials equal here share one training (up to the longest
        of their ``epochs``); the rest (epochs, clusterers, manifold, eval split) happens after."""
        after = {"epochs", "n_clusters", "clusterers", "kmeans", "gmm", "eval_split", "manifold", "eval_clusterers", "dec"}
        if self.shuffle == "once":  # settings added later at their old behaviour keep the trainings' keys
            after.add("shuffle")
        return self.model_dump(mode="json", exclude=after)

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
        """Stable 16-hex-digit hash of the resolved config: the identity of a trial across runs and machines.

        Settings at their default value are left out, so that a setting added to fmc later (with a
        default that keeps the old behaviour) does not change the keys of trials already recorded.
        """
        return _hash(self.model_dump(mode="json", exclude_defaults=True))

    def training_key(self) -> str:
        """Hash of :meth:`training`: trials with equal training keys can share one training."""
        return _hash(self.training())


def _hash(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Resources(_Strict):
    cpu: PositiveFloat = 1
    gpu: float = Field(0, ge=0)


class Trial(_Strict):
    """A named, resolved trial of a sweep."""

    name: str
    config: TrialConfig


class Select(_Strict):
    """Which trial's clusterer a sweep registers as ``models:/<experiment>@best``: the finished trial
    with the best ``metric`` (a clusterer's score, e.g. ``gmm_nmi``; the model is that clusterer's)."""

    metric: str = "gmm_nmi"
    mode: Literal["max", "min"] = "max"

    @model_validator(mode="after")
    def _a_clusterer_score(self) -> Select:
        from fmnist_cluster.metrics import label_free_names, score_names

        known = score_names() + label_free_names()
        if self.metric not in known:
            raise ValueError(f"metric {self.metric!r} is not a clusterer's score or criterion; one of {', '.join(known)}")
        return self

    @property
    def clusterer(self) -> str:
        return self.metric.split("_", 1)[0]


def search_metrics() -> list[str]:
    """What a search may optimise: a clusterer's score (uses the labels: a supervised selection), a
    label-free criterion (silhouette, BIC, log-likelihood, inertia) or the reconstruction error."""
    from fmnist_cluster.metrics import label_free_names, score_names

    return score_names() + label_free_names() + ["recon_mse"]


def metric_mode(metric: str) -> str:
    """The direction in which ``metric`` is better: 'max' or 'min'."""
    from fmnist_cluster.metrics import LABEL_FREE

    clusterer, _, criterion = metric.partition("_")
    if metric == "recon_mse":
        return "min"
    return LABEL_FREE.get(clusterer, {}).get(criterion, "max")


class Search(_Strict):
    """Sample the sweep's ``space`` around its one trial: ``random`` (Ray Tune's random search) or
    ``optuna`` (Ray Tune's OptunaSearch, TPE), ``num_samples`` trials in all, optimising ``metric``
    (a trial's final value; ``mode`` defaults to the metric's own direction). ``seed`` fixes the
    samples drawn, so that the same search run again draws the same trials (see README: resume)."""

    algorithm: Literal["random", "optuna"] = "random"
    metric: str = "gmm_silhouette"
    mode: Literal["max", "min"] | None = None
    num_samples: PositiveInt = 8
    seed: int = Field(0, ge=0)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in search_metrics():
            raise ValueError(f"metric {metric!r} is not a trial's final value; one of {', '.join(search_metrics())}")
        return metric

    @model_validator(mode="after")
    def _direction(self) -> Search:
        if self.mode is None:
            object.__setattr__(self, "mode", metric_mode(self.metric))
        return self

    @property
    def supervised(self) -> bool:
        """Whether the metric looks at the labels (a clusterer's score against them)."""
        from fmnist_cluster.metrics import score_names

        return self.metric in score_names()


class Scheduler(_Strict):
    """Early stopping of trials by their training loss (Ray Tune's ASHAScheduler over epochs): a trial
    is stopped at a rung (``grace_period`` x ``reduction_factor``^k epochs) when its ``metric`` is not
    among the best 1/``reduction_factor`` reached there; ``max_t`` defaults to the trials' epochs."""

    kind: Literal["asha"] = "asha"
    metric: Literal["val_loss", "loss"] = "val_loss"
    mode: Literal["min"] = "min"
    grace_period: PositiveInt = 1
    max_t: PositiveInt | None = None
    reduction_factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _rungs(self) -> Scheduler:
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period = {self.grace_period} is past max_t = {self.max_t}: no trial could stop early")
        return self


# how a search space samples a setting: {uniform: [a, b]}, {loguniform: [a, b]}, {randint: [a, b]}
# (a <= n < b, as Ray Tune draws it), {choice: [v1, v2, ...]}
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


def _yaml_number(value: Any) -> Any:
    """PyYAML reads ``1e-3`` (no dot) as text; a bound written so is the number meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def normalise_space(space: Any) -> Any:
    """``space:`` with the bounds of uniform and loguniform as numbers where YAML left them text."""
    if not isinstance(space, dict):
        return space
    out = {}
    for key, spec in space.items():
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("uniform", "loguniform"):
            kind, args = next(iter(spec.items()))
            spec = {kind: [_yaml_number(a) for a in args] if isinstance(args, list) else args}
        out[key] = spec
    return out


def distribution_error(spec: Any) -> str | None:
    """What is wrong with one ``space:`` entry, or None."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        return f"a distribution is one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, got {_show(spec)}"
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return None if isinstance(args, list) and args else f"choice takes a non-empty list, got {_show(args)}"
    numbers = isinstance(args, list) and len(args) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if not numbers:
        return f"{kind} takes [low, high], two numbers, got {_show(args)}"
    low, high = args
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        return f"randint takes two integers, got {_show(args)}"
    if low >= high:
        return f"{kind}: low must be below high, got {_show(args)}"
    if kind == "loguniform" and low <= 0:
        return f"loguniform needs low > 0, got {_show(args)}"
    return None


def distribution_values(spec: dict) -> list[Any]:
    """The values to check a distribution's settings with: its ends, or every choice."""
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return list(args)
    return [args[0], args[1] - 1] if kind == "randint" else list(args)


def sampled(base: TrialConfig, sample: dict[str, Any]) -> dict[str, Any]:
    """The config dict of ``base`` with the dotted settings of ``sample`` set (not yet validated)."""
    cfg = base.model_dump(mode="json")
    for key, value in sample.items():
        _set_dotted(cfg, key, value)
    return cfg


def sampled_name(base: str, config: TrialConfig) -> str:
    """A searched trial's name: its base trial's and its key's first digits (the same sample, the same name)."""
    return f"{base}-{config.key()[:8]}"


class Sweep(_Strict):
    experiment: str = Field(min_length=1)
    data: DataConfig = DataConfig()
    defaults: dict[str, Any] = {}
    trials: tuple[dict[str, Any], ...] = Field(min_length=1)
    grid: dict[str, tuple[Any, ...]] = {}
    # every trial (and grid combination) once per seed; a seed sets the training and clusterer seed
    # (``seed``) and the data shuffle and split (``data.seed``) together
    seeds: tuple[Annotated[int, Field(ge=0)], ...] = ()
    resources: Resources = Resources()
    max_concurrent: PositiveInt | None = None
    select: Select = Select()
    search: Search | None = None
    space: dict[str, Any] = {}  # dotted setting -> distribution, sampled by search
    scheduler: Scheduler | None = None
    source: str = Field("", exclude=True)  # the file text, logged with the parent run
    path: str = Field("", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _numbers_in_space(cls, values: Any):
        if isinstance(values, dict) and "space" in values:
            values = {**values, "space": normalise_space(values["space"])}
        return values

    def per_trial(self, cpu: float | None = None, gpu: float | None = None) -> dict[str, float]:
        """What each trial asks Ray for: the file's ``resources`` with the command line's --cpu/--gpu on top."""
        return {"cpu": cpu or self.resources.cpu, "gpu": self.resources.gpu if gpu is None else gpu}

    def expand(self) -> list[Trial]:
        """Resolved trials (validated by :func:`load_sweep`)."""
        return [Trial(name=name, config=TrialConfig(**cfg)) for name, cfg, _ in _expand(self)]


# Trial names become Ray Tune trial folders and MLflow run names.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")
NAME_RULE = "cannot be a folder name: use letters, digits and . _ + = - (no spaces or slashes), at most 100"


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
    """Name part for a grid value: 'seed1', 'covariance_type-full', 'manifold-umap' (for manifold.kind)."""
    parts = dotted.split(".")
    last = parts[-2] if parts[-1] == "kind" and len(parts) > 1 else parts[-1]
    if isinstance(value, (list, tuple)):
        value = ".".join(map(str, value))
    return f"{last}{value}" if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{last}-{value}"


def _expand(sweep: Sweep):
    """Yield (name, config dict, (trial index, grid combination)) for every resolved trial."""
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
            for seed in sweep.seeds or [None]:
                if seed is None:
                    yield name, cfg, (i, combo)
                else:
                    seeded = _set_dotted(_set_dotted(copy.deepcopy(cfg), "seed", seed), "data.seed", seed)
                    yield f"{name}-seed{seed}", seeded, (i, combo)


# ---------------------------------------------------------------- YAML with locations


class _LineLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a sweep file with one is an error instead."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


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
    """(key path, message) of every error, the message ending with the offending value when it is one."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        if e["type"] not in ("missing", "value_error", "assertion_error") and not isinstance(value, dict):
            msg += f", got {_show(value)}"
        out.append((prefix + loc, msg))
    return out


def _show(value: Any) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 80 else text[:77] + "..."


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
        raw = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{path}: cannot read sweep file: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                        "save the sweep file as UTF-8") from None
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
                report(("trials", i), f"every trial needs a name (a non-empty string), got {entry.get('name')!r}")
            elif not NAME_RE.fullmatch(entry["name"]):
                report(("trials", i, "name"), f"trial name {entry['name']!r} {NAME_RULE}")
            if sweep.seeds and ("seed" in entry or "seed" in (entry.get("data") or {})):
                where = ("trials", i, "seed") if "seed" in entry else ("trials", i, "data", "seed")
                report(where, "seeds is set: it gives every trial its seed and data.seed")
        if sweep.seeds:
            for k in ("seed", "data.seed"):
                if k in sweep.grid:
                    report(("grid", k), f"grid.{k} and seeds both set the seeds; keep one")
            if len(set(sweep.seeds)) != len(sweep.seeds):
                report(("seeds",), f"seeds lists a seed twice: {list(sweep.seeds)}")
        _check_search(sweep, report)
        seen_names: dict[str, int] = {}
        seen_keys: dict[str, str] = {}
        if not problems:
            for name, cfg, (i, _combo) in _expand(sweep):
                try:
                    config = TrialConfig(**cfg)
                except ValidationError as err:
                    for loc, msg in _errors(err):
                        problems.append((_locate(root, i, loc), f"trials[{i}] ({name}): {_fmt_path(loc) + ': ' if loc else ''}{msg}"))
                    continue
                if not NAME_RE.fullmatch(name):
                    problems.append((_locate(root, i, ()), f"trials[{i}]: the grid makes the name {name!r}, which "
                                                           f"{NAME_RULE}"))
                if name in seen_names:
                    report(("trials", i, "name"), f"duplicate trial name {name!r} (also trials[{seen_names[name]}])")
                elif config.key() in seen_keys:
                    report(("trials", i), f"trial {name!r} has the same settings as {seen_keys[config.key()]!r}")
                seen_names.setdefault(name, i)
                seen_keys.setdefault(config.key(), name)
                trials.append(Trial(name=name, config=config))
        if not problems and not trials:
            report((), "the sweep expands to no trials")
        if not problems and sweep.search is not None:
            for key, spec in sweep.space.items():
                for value in distribution_values(spec):
                    try:
                        TrialConfig(**sampled(trials[0].config, {key: value}))
                    except (ValidationError, ValueError) as err:
                        why = "; ".join(m for _, m in _errors(err)) if isinstance(err, ValidationError) else str(err)
                        report(("space", key), f"{key} = {_show(value)} makes trial {trials[0].name!r} invalid: {why}")
        if not problems and sweep.scheduler is not None:
            longest = max(t.config.epochs for t in trials)
            if "epochs" in sweep.space:  # a search may draw longer trials
                longest = max([longest, *distribution_values(sweep.space["epochs"])])
            if sweep.scheduler.max_t is not None and sweep.scheduler.max_t > longest:
                report(("scheduler", "max_t"), f"max_t = {sweep.scheduler.max_t} is past the trials' {longest} epochs")
            if sweep.scheduler.grace_period >= longest:
                report(("scheduler", "grace_period"), f"grace_period = {sweep.scheduler.grace_period} leaves no "
                                                      f"epoch to stop at: the trials train {longest} epochs")
            unheld = [t.name for t in trials if t.config.fit_split == "all"]
            if sweep.scheduler.metric == "val_loss" and unheld:
                report(("scheduler", "metric"), f"metric val_loss: trial {unheld[0]!r} trains on all images "
                                                "(fit_split: all) and holds none out; use metric: loss")
    if problems:
        lines = [f"{path}:{node.start_mark.line + 1}: {msg}" for node, msg in problems]
        raise SpecError("\n".join(lines))
    return sweep


def _check_search(sweep: Sweep, report) -> None:
    """A search samples ``space`` around one trial; grids and seeds belong to grid sweeps."""
    if sweep.space and sweep.search is None:
        report(("space",), "space is sampled by a search: add search: {algorithm: random|optuna, metric: ..., "
                           "num_samples: N}")
    if sweep.search is None:
        return
    if not sweep.space:
        report(("search",), "a search needs a space: section, e.g. space: {learning_rate: {loguniform: [1e-4, 1e-2]}}")
    if len(sweep.trials) != 1:
        report(("trials",), f"a search samples the space around one trial; found {len(sweep.trials)}")
    for section in ("grid", "seeds"):
        if getattr(sweep, section):
            report((section,), f"{section} applies to grid sweeps; in a search, sample it in space: "
                               f"(e.g. seed: {{randint: [0, 100]}})")
    for key, spec in sweep.space.items():
        if key == "name" or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key):
            report(("space", key), f"{key!r} is not a trial setting (dotted, e.g. gmm.covariance_type)")
        elif (why := distribution_error(spec)) is not None:
            report(("space", key), why)


def load_trial(path: str | Path, name: str) -> TrialConfig:
    """The resolved config of trial ``name`` of a sweep file."""
    trials = {t.name: t.config for t in load_sweep(path).expand()}
    if name not in trials:
        raise SpecError(f"{path}: no trial named {name!r}; trials are: {', '.join(trials)}")
    return trials[name]
