"""Benchmark suites: a TOML file that says what to run, validated on load.

A suite is data, never code: it is parsed with ``tomllib`` and checked key by key; an unknown
key or a bad value raises :class:`SuiteError` naming the offending key (``threats[1].eps``).

Example (the shipped default is ``unmask/bench/suites/default.toml``)::

    name = "my-suite"
    dataset = "mnist5k"          # a registered dataset (unmask data list)
    split = "test"
    n = 500                      # samples evaluated (the first n of the split)
    batch_size = 250             # fixed batches: results do not depend on sharding
    seed = 0
    channels_last = false        # run conv models in channels_last memory format (faster on
                                 # CPUs and GPUs; results agree to float rounding)
    models = ["mnist-cnn", "mypkg.models:build_model"]   # zoo names or module:function

    [[models]]                   # or tables, with options
    name = "mnist-cnn-pgdat"
    optional = true              # not in the zoo yet: recorded as unavailable, not an error

    [[threats]]
    norm = "linf"
    eps = [0.1, 0.3]

    [attacks]
    preset = "standard"          # or "adaptive", "quick", or: list = ["fgsm", { name = "pgd", steps = 40 },
                                 #   { name = "eot", attack = "apgd", samples = 16 },
                                 #   { name = "bpda", attack = "pgd", steps = 40 }]
    draws = 32                   # fresh draws judging a randomised model (core.DRAWS)
    # budget = 600               # "adaptive" only: forward+backward passes per sample
    precision = "fp32"           # "bf16": search under autocast (faster on bf16 hardware),
                                 # every verdict still the fp32 model's

    [masking]
    enabled = true
    follow_up = true
    surrogate = "auto"           # the transfer check's surrogate: "auto" (a standard-trained
                                 # zoo model of the suite's dataset), a zoo name, or "none"

    [explain]
    methods = ["saliency", "integrated_gradients"]
    metrics = ["deletion_insertion", "randomisation"]

    [backdoor]
    enabled = true

    [curves]                     # security curves: robust accuracy against eps
    enabled = true
    models = "ranked"            # "ranked" (ranked and not masked), "all", or model keys
    points = 10                  # grid per norm: 10 eps evenly up to its largest suite eps
    # eps = { linf = [0.05, 0.1, 0.2, 0.3] }   # or an explicit grid per norm
    # attacks = ["apgd", "apgd-t"]             # the per-sample search ([attacks] list syntax)
    [certify]                    # proven lower bounds next to the attack numbers
    methods = ["ibp", "crown", "milp"]   # milp: exact (Linf only), needs highspy
    time_limit = 10.0            # MILP seconds per sample; a timeout leaves it "unknown"
    n = 100                      # optional: the first n samples (default: all)

    [quick]                      # what --quick changes (all optional)
    n = 100

Usage: ``suite = load_suite("suite.toml")`` or ``load_suite(None)`` for the default;
``suite.quick()`` is the smoke variant.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ...attacks import ATTACKS, Ensemble
from ...attacks.ensemble import PRESETS
from ...defenses.certified import BoundMethod
from ...explain.attribution import METHODS as EXPLAIN_METHODS
from ...explain.metrics import METRICS as EXPLAIN_METRICS
from .. import data as data_mod
from .. import zoo
from ..core import DRAWS, Norm, Precision, Threat, select_device
from ..zoo.resolve import ROBUSTBENCH_PREFIX, build_user_model
from ..zoo.robustbench import SPEC_OPTIONS, load_spec, parse_robustbench_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Suite", "ModelSpec", "ThreatSpec", "AttackSpec", "MaskingSpec", "ExplainSpec",
           "BackdoorSpec", "CertifySpec", "QuickSpec", "SuiteError", "load_suite", "parse_suite",
           "default_suite_path", "resolve_user_model", "EXPLAIN_METRICS", "is_user_model",
           "build_attack", "default_surrogate", "WRAPPERS", "CurveSpec", "CURVE_MODELS"]

CERTIFY_METHODS = tuple(m.value for m in BoundMethod)


class SuiteError(ValueError):
    """A suite file is invalid; the message names the file and the offending key."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


# --- the parts of a suite ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model: a zoo name or ``module:function`` (returning an ``nn.Module``)."""

    name: str
    label: str = ""
    optional: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The name the model has in the store and the leaderboard."""
        return self.label or self.name

    @property
    def is_user(self) -> bool:
        """True when the name is a user's model (``module:function`` or ``robustbench:...``), not
        a zoo name.
        """
        return is_user_model(self.name)


@dataclass(frozen=True)
class ThreatSpec:
    """``[[threats]]``: one norm and the eps values to evaluate it at."""
    norm: str
    eps: tuple[float, ...]


@dataclass(frozen=True)
class AttackSpec:
    """The ensemble: a named preset, or an explicit list of ``{name, **options}``."""

    preset: str | None = "standard"
    attacks: tuple[dict[str, Any], ...] = ()
    draws: int = DRAWS
    precision: str = "fp32"  # the attacks' search precision; verdicts are always fp32's
    budget: int | None = None  # forward+backward passes per sample (presets that take one)


# ``surrogate`` values that name no model.
SURROGATE_AUTO, SURROGATE_NONE = "auto", "none"


@dataclass(frozen=True)
class MaskingSpec:
    """The masking section: the diagnosis of every model at every threat, on the first ``n``
    samples. ``surrogate`` is the transfer check's surrogate: ``"auto"`` (a standard-trained
    zoo model of the suite's dataset, see :func:`default_surrogate`), a zoo name, or
    ``"none"`` (the check is skipped and says so)."""

    enabled: bool = True
    follow_up: bool = False
    fast: bool = False
    n: int = 200
    surrogate: str = SURROGATE_AUTO


@dataclass(frozen=True)
class ExplainSpec:
    """``[explain]``: attribution methods and metrics on the first ``n`` test samples, IG steps,
    and how many maps per model and method the report keeps; off unless ``enabled``.
    """
    enabled: bool = False
    methods: tuple[str, ...] = ("saliency",)
    metrics: tuple[str, ...] = ("deletion_insertion",)
    n: int = 32
    ig_steps: int = 32
    maps: int = 4  # attribution maps kept per model and method for the report's figures


@dataclass(frozen=True)
class BackdoorSpec:
    """``[backdoor]``: evaluate backdoored models (default: the suite's models trained with the
    backdoor recipe) and, with ``defenses``, poison detection, STRIP and fine-pruning.
    """
    enabled: bool = False
    models: tuple[str, ...] = ()  # empty: the suite's models trained with the backdoor recipe
    defenses: bool = False        # poison detection, STRIP and fine-pruning (slow)


# ``[curves] models`` selections that name no model.
CURVE_MODELS = ("ranked", "all")
# The per-sample minimum-eps search of the curves: APGD-CE then APGD-T (1 target), 40 steps
# each. Measured on the default suite's ranked models (docs in unmask.bench.suite.curves): within 3
# points of the full standard ensemble at the intermediate eps checked, at 0.44x the passes
# of 50 steps and 3 targets; 20 steps each halve the cost but read up to 8 points high.
CURVE_ATTACKS: tuple[dict[str, Any], ...] = (
    {"name": "apgd", "steps": 40, "loss": "ce"}, {"name": "apgd-t", "steps": 40, "n_targets": 1})


@dataclass(frozen=True)
class CurveSpec:
    """The ``[curves]`` section: security curves (robust accuracy against eps) from a
    per-sample minimum-eps search (:mod:`unmask.bench.suite.curves`).

    ``models``: ``("ranked",)`` (the models whose diagnosis at every eps of the norm finished,
    is ranked and is not ``masked``: a gradient search is as blind as the masking), ``("all",)``
    or model keys. ``points``: the grid of a norm is ``points`` eps evenly spaced up to the
    norm's largest suite eps; ``eps`` (norm -> list) replaces it. The suite's own eps are always
    on the grid. ``attacks``: the search, ``[attacks] list`` syntax."""

    enabled: bool = False
    models: tuple[str, ...] = ("ranked",)
    points: int = 10
    eps: dict[str, tuple[float, ...]] = field(default_factory=dict)
    attacks: tuple[dict[str, Any], ...] = CURVE_ATTACKS


@dataclass(frozen=True)
class CertifySpec:
    """The ``[certify]`` section: proven lower bounds of robust accuracy
    (:func:`unmask.defenses.certified.certify`) for every model whose layers the bounds
    support, at every threat of the suite, on the first ``n`` samples (None: all).
    ``time_limit``: MILP seconds per sample (a timeout leaves the sample unknown)."""

    enabled: bool = False
    methods: tuple[str, ...] = CERTIFY_METHODS
    time_limit: float = 10.0
    n: int | None = None


@dataclass(frozen=True)
class QuickSpec:
    """What ``--quick`` changes: fewer samples, the quick ensemble, a fast diagnosis."""

    n: int = 100
    batch_size: int | None = None
    preset: str = "quick"
    eps: tuple[float, ...] | None = None   # None: the largest eps of each threat
    masking_fast: bool = True
    masking_n: int = 100
    explain_n: int = 8
    explain_metrics: tuple[str, ...] = ("deletion_insertion",)
    models: tuple[str, ...] = ()           # empty: every model


@dataclass(frozen=True)
class Suite:
    """A validated suite. Build it with :func:`load_suite` or :func:`parse_suite`."""

    name: str
    dataset: str
    models: tuple[ModelSpec, ...]
    threats: tuple[ThreatSpec, ...]
    description: str = ""
    split: str = "test"
    n: int = 500
    batch_size: int = 250
    seed: int = 0
    device: str | None = None
    channels_last: bool = False
    data_options: dict[str, Any] = field(default_factory=dict)
    attacks: AttackSpec = AttackSpec()
    masking: MaskingSpec = MaskingSpec()
    explain: ExplainSpec = ExplainSpec()
    backdoor: BackdoorSpec = BackdoorSpec()
    curves: CurveSpec = CurveSpec()
    certify: CertifySpec = CertifySpec()
    quick_spec: QuickSpec = QuickSpec()
    is_quick: bool = False
    source: str | None = None

    def threat_list(self) -> list[tuple[str, float]]:
        """Every (norm, eps) of the suite, in file order."""
        return [(t.norm, e) for t in self.threats for e in t.eps]

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration (JSON), stored with each run; :func:`parse_suite`
        reads it back."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("is_quick")
        d["quick"] = d.pop("quick_spec")
        d["models"] = [{k: v for k, v in m.items() if v or k == "name"} for m in d["models"]]
        att = d["attacks"]
        d["attacks"] = ({"preset": att["preset"], "draws": att["draws"]} if att["preset"]
                        else {"list": [dict(a) for a in att["attacks"]], "draws": att["draws"]})
        if att["precision"] != "fp32":  # absent for fp32: earlier runs keep their config hash
            d["attacks"]["precision"] = att["precision"]
        if att["budget"] is not None:  # absent when unset: earlier runs keep their hash
            d["attacks"]["budget"] = att["budget"]
        if d["masking"]["surrogate"] == SURROGATE_AUTO:  # absent for the default: hashes kept
            d["masking"].pop("surrogate")
        if not d["certify"]["enabled"]:  # absent when off: earlier runs keep their hash
            d.pop("certify")
        elif d["certify"]["n"] is None:
            d["certify"].pop("n")
        for key in ("device",):
            if d[key] is None:
                d.pop(key)
        if not self.curves.enabled:  # absent when off: earlier runs keep their config hash
            d.pop("curves")
        else:
            d["curves"]["attacks"] = [dict(a) for a in self.curves.attacks]
        q = d["quick"]
        for key in ("batch_size", "eps"):
            if q[key] is None:
                q.pop(key)
        return json.loads(json.dumps(d))  # tuples -> lists

    def config_hash(self) -> str:
        """16 hex digits of SHA-256 over the suite and its quick flag: identifies the
        configuration of a run.
        """
        blob = json.dumps({"suite": self.to_dict(), "quick": self.is_quick}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def quick(self) -> Suite:
        """The smoke variant: ``[quick]``'s sample count, preset, eps and fast diagnosis (and
        security curves of at most 4 points, searched with at most 10 steps; ``[certify]``
        kept, its MILP time limit capped at 2 s per sample)."""
        q = self.quick_spec
        threats = []
        for t in self.threats:
            eps = tuple(e for e in t.eps if q.eps is None or e in q.eps)
            if q.eps is None:
                eps = (max(t.eps),)
            if eps:
                threats.append(ThreatSpec(t.norm, eps))
        if not threats:
            threats = [ThreatSpec(self.threats[0].norm, (max(self.threats[0].eps),))]
        models = tuple(m for m in self.models if not q.models or m.key in q.models)
        metrics = tuple(m for m in self.explain.metrics if m in q.explain_metrics)
        return dataclasses.replace(
            self, n=min(self.n, q.n), batch_size=q.batch_size or min(self.batch_size, q.n),
            threats=tuple(threats), models=models or self.models,
            attacks=AttackSpec(preset=q.preset, draws=self.attacks.draws,
                               precision=self.attacks.precision),
            masking=dataclasses.replace(self.masking, fast=q.masking_fast, follow_up=False,
                                        n=min(self.masking.n, q.masking_n)),
            explain=dataclasses.replace(self.explain, n=min(self.explain.n, q.explain_n),
                                        metrics=metrics, maps=min(self.explain.maps, 2)),
            backdoor=dataclasses.replace(self.backdoor, defenses=False),
            curves=dataclasses.replace(
                self.curves, points=min(self.curves.points, 4),
                attacks=tuple({**a, "steps": min(a["steps"], 10)} if "steps" in a else a
                              for a in self.curves.attacks)),
            # the bounds are cheap; a smoke run caps the MILP at 2 s per sample
            certify=dataclasses.replace(self.certify,
                                        time_limit=min(self.certify.time_limit, 2.0)),
            is_quick=True)

    def build_attacks(self, norm: str, eps: float):
        """The ensemble of this suite for one threat."""

        threat = Threat(norm, eps)
        if self.attacks.preset is not None:
            return Ensemble.preset(self.attacks.preset, threat, draws=self.attacks.draws,
                                   precision=self.attacks.precision,
                                   budget=self.attacks.budget)
        built = [build_attack(spec, threat) for spec in self.attacks.attacks]
        return Ensemble(built, draws=self.attacks.draws, precision=self.attacks.precision)


# --- validation -------------------------------------------------------------------------------


class _Table:
    """A TOML table being validated: typed getters that know the key path; leftover keys are
    errors."""

    def __init__(self, data: Any, path: str, source: str | None) -> None:
        self.path = path
        self.source = source
        if not isinstance(data, Mapping):
            raise SuiteError(path or "(top level)",
                             f"expected a table, got {_tname(data)}", source)
        self.data = dict(data)
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> SuiteError:
        return SuiteError(self.key(name), message, self.source)

    def has(self, name: str) -> bool:
        return name in self.data

    def _default(self, name: str, default: Any) -> Any:
        """The value of an absent key: ``default``, or an error when the key is required
        (``default`` is ``...``)."""
        if default is ...:
            raise self.error(name, "is required")
        self.used.add(name)
        return default

    def raw(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def text(self, name: str, default: Any = ..., choices: Sequence[str] | None = None,
             allow_empty: bool = False) -> Any:
        if name not in self.data:
            return self._default(name, default)
        value = self.raw(name)
        if not isinstance(value, str) or not (value or allow_empty):
            raise self.error(name, f"expected a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(name, f"unknown value {value!r}; expected one of "
                                   f"{', '.join(repr(c) for c in choices)}")
        return value

    def integer(self, name: str, default: Any = ..., minimum: int = 0) -> Any:
        if name not in self.data:
            return self._default(name, default)
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        if name not in self.data:
            self.used.add(name)
            return default
        value = self.raw(name)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {value!r}")
        return value

    def str_list(self, name: str, default: Sequence[str], choices: Sequence[str] | None = None
                 ) -> tuple[str, ...]:
        if name not in self.data:
            self.used.add(name)
            return tuple(default)
        value = self.raw(name)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(name, f"expected a list of strings, got {_tname(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise SuiteError(f"{self.key(name)}[{i}]", f"expected a string, got {v!r}",
                                 self.source)
            if choices is not None and v not in choices:
                raise SuiteError(f"{self.key(name)}[{i}]",
                                 f"unknown value {v!r}; expected one of "
                                 f"{', '.join(repr(c) for c in choices)}", self.source)
        return tuple(value)

    def table(self, name: str) -> _Table:
        return _Table(self.raw(name, {}), self.key(name), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:

            name = unknown[0]
            close = difflib.get_close_matches(name, sorted(self.used), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            valid = ", ".join(sorted(self.used))
            raise self.error(name, f"unknown key{hint}; valid keys here: {valid}")


def _tname(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", int: "an integer",
            float: "a float", bool: "a boolean"}.get(type(value), type(value).__name__)


# A model spec string naming a RobustBench-style checkpoint (unmask.bench.zoo.robustbench).


def is_user_model(name: str) -> bool:
    """``module:function`` (or ``robustbench:<dataset>/<threat>/<name>``) names a user's own
    model; anything else is a zoo name."""
    return ":" in name


def _number(value: Any, key: str, source: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SuiteError(key, f"expected a number, got {value!r}", source)
    value = float(value)
    if not value >= 0 or value == float("inf"):
        raise SuiteError(key, f"eps must be a finite number >= 0, got {value}", source)
    return value


def _models(raw: Any, source: str | None, dataset: str, check_zoo: bool) -> tuple[ModelSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise SuiteError("models", "expected a non-empty list of zoo names, module:function "
                                   "strings or tables with a 'name'", source)
    zoo_names: list[str] | None = None
    specs: list[ModelSpec] = []
    for i, item in enumerate(raw):
        key = f"models[{i}]"
        if isinstance(item, str):
            t = _Table({"name": item}, key, source)
        else:
            t = _Table(item, key, source)
        name = t.text("name")
        label = t.text("label", "", allow_empty=True)
        optional = t.flag("optional", False)
        kwargs = t.raw("kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise t.error("kwargs", f"expected a table of keyword arguments, got {kwargs!r}")
        t.done()
        if kwargs and not is_user_model(name):
            raise t.error("kwargs", "only a module:function model takes kwargs")
        if name.startswith(ROBUSTBENCH_PREFIX):

            try:
                parse_robustbench_spec(name)
            except ValueError as err:
                raise SuiteError(f"{key}.name", str(err), source) from None
            for opt in kwargs:
                if opt not in SPEC_OPTIONS:
                    raise SuiteError(f"{key}.kwargs.{opt}", f"a robustbench model takes "
                                     f"{', '.join(SPEC_OPTIONS)}", source)
        elif is_user_model(name):
            module, _, func = name.partition(":")
            if not module or not func or not all(p.isidentifier() for p in module.split(".")) \
                    or not func.isidentifier():
                raise SuiteError(f"{key}.name", f"{name!r} is not 'package.module:function'",
                                 source)
        elif check_zoo:

            if zoo_names is None:
                zoo_names = zoo.list()
            if name not in zoo_names:
                if not optional:

                    close = difflib.get_close_matches(name, zoo_names, n=3)
                    hint = f" Did you mean {', '.join(close)}?" if close else ""
                    raise SuiteError(f"{key}.name",
                                     f"unknown zoo model {name!r}.{hint} Known: "
                                     f"{', '.join(zoo_names)}; a missing entry that may land "
                                     "later can be marked optional = true", source)
            else:
                entry_dataset = zoo.get(name).dataset
                if entry_dataset != dataset:
                    raise SuiteError(f"{key}.name", f"zoo model {name!r} is trained on "
                                     f"{entry_dataset!r}, but the suite's dataset is "
                                     f"{dataset!r}", source)
        spec = ModelSpec(name=name, label=label, optional=optional, kwargs=dict(kwargs))
        if any(s.key == spec.key for s in specs):
            raise SuiteError(key, f"model {spec.key!r} is listed twice (give one a label)",
                             source)
        specs.append(spec)
    return tuple(specs)


def _threats(raw: Any, source: str | None) -> tuple[ThreatSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise SuiteError("threats", "expected a non-empty list of tables "
                                    "{ norm = 'linf', eps = [0.1, 0.3] }", source)
    out = []
    for i, item in enumerate(raw):
        t = _Table(item, f"threats[{i}]", source)
        norm = t.text("norm", choices=[n.value for n in Norm])
        eps_raw = t.raw("eps")
        if eps_raw is None:
            raise t.error("eps", "is required (a number or a list of numbers)")
        if not isinstance(eps_raw, list):
            eps = (_number(eps_raw, t.key("eps"), source),)
        else:
            if not eps_raw:
                raise t.error("eps", "is an empty list")
            eps = tuple(_number(e, f"{t.key('eps')}[{j}]", source) for j, e in enumerate(eps_raw))
        if len(set(eps)) != len(eps):
            raise t.error("eps", f"lists an eps twice: {list(eps)}")
        t.done()
        out.append(ThreatSpec(norm, eps))
    return tuple(out)


def _attack_names() -> dict[str, Any]:
    usable = {}
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        params = list(inspect.signature(cls.__init__).parameters)
        if len(params) > 1 and params[1] == "threat":
            usable[name] = cls
    return usable


def _attacks(t: _Table, list_key: str = "list") -> AttackSpec:
    draws = t.integer("draws", DRAWS, minimum=1)
    precision = t.text("precision", "fp32", choices=[p.value for p in Precision])
    if t.has("preset") and t.has(list_key):
        raise t.error(list_key, f"give either 'preset' or '{list_key}', not both")
    if t.has("budget") and t.has(list_key):
        raise t.error("budget", f"a budget in passes per sample applies to a preset, not to "
                                f"'{list_key}' (set each attack's steps or queries)")
    if t.has(list_key):
        raw = t.raw(list_key)
        if not isinstance(raw, list) or not raw:
            raise t.error(list_key, "expected a non-empty list of attack names or tables "
                                    "{ name = 'pgd', steps = 40 }")
        usable = _attack_names()
        specs = []
        for i, item in enumerate(raw):
            key = f"{t.key(list_key)}[{i}]"
            spec = {"name": item} if isinstance(item, str) else item
            if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
                raise SuiteError(key, "expected an attack name or a table with a 'name'",
                                 t.source)
            name = spec["name"]
            if name in WRAPPERS:
                _check_wrapper(spec, key, usable, t.source)
                specs.append(dict(spec))
                continue
            if name not in usable:
                raise SuiteError(f"{key}.name", f"unknown attack {name!r}; suites can use "
                                 f"{', '.join(sorted([*usable, *WRAPPERS]))}", t.source)
            cls = usable[name]
            params = inspect.signature(cls.__init__).parameters
            for opt in spec:
                if opt != "name" and (opt not in params or opt in ("self", "threat")):
                    valid = [p for p in params if p not in ("self", "threat")]
                    raise SuiteError(f"{key}.{opt}", f"{name} has no option {opt!r}; its "
                                     f"options: {', '.join(valid) or 'none'}", t.source)
            try:  # construct once with a dummy threat so a bad value fails here, not mid-run

                cls(Threat("linf", 0.1), **{k: v for k, v in spec.items() if k != "name"})
            except (TypeError, ValueError) as err:
                raise SuiteError(key, str(err), t.source) from None
            specs.append(dict(spec))
        return AttackSpec(preset=None, attacks=tuple(specs), draws=draws, precision=precision)
    preset = t.text("preset", "standard", choices=PRESETS.names())
    budget = t.integer("budget", None, minimum=1)
    if budget is not None:
        try:  # a preset with a fixed budget, or a budget below its floor, fails here
            Ensemble.preset(preset, Threat("linf", 0.1), budget=budget)
        except ValueError as err:
            raise t.error("budget", str(err)) from None
    return AttackSpec(preset=preset, draws=draws, precision=precision, budget=budget)


# Attacks that wrap another one (``attack = "apgd"``): their own options, and the inner
# attacks they accept (gradient attacks only: EOT and BPDA replace a gradient).
WRAPPERS = {"eot": ("samples", "eval_draws"), "bpda": ("approximations",)}


def _split_wrapper(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``{name = "eot", attack = "apgd", samples = 16, steps = 50}`` -> (inner name, the
    wrapper's options, the inner attack's options)."""
    own = WRAPPERS[spec["name"]]
    outer = {k: v for k, v in spec.items() if k in own}
    inner = {k: v for k, v in spec.items() if k not in own and k not in ("name", "attack")}
    return spec.get("attack"), outer, inner


def build_attack(spec: Mapping[str, Any], threat):
    """The attack of one ``[attacks] list`` entry for ``threat`` (EOT and BPDA wrap the
    attack named by ``attack``)."""

    if spec["name"] in WRAPPERS:
        inner_name, outer, inner = _split_wrapper(spec)
        return ATTACKS.get(spec["name"])(ATTACKS.get(inner_name)(threat, **inner), **outer)
    return ATTACKS.get(spec["name"])(threat, **{k: v for k, v in spec.items() if k != "name"})


def _check_wrapper(spec: Mapping[str, Any], key: str, usable: Mapping[str, Any],
                   source: str | None) -> None:

    name = spec["name"]
    inner_name = spec.get("attack")
    gradient = sorted(n for n, c in usable.items() if not getattr(c, "gradient_free", False))
    if not isinstance(inner_name, str):
        raise SuiteError(f"{key}.attack", f"{name} wraps a gradient attack: give attack = "
                         f"one of {', '.join(gradient)}", source)
    if inner_name not in gradient:
        raise SuiteError(f"{key}.attack", f"{name} wraps a gradient attack, got "
                         f"{inner_name!r}; expected one of {', '.join(gradient)}", source)
    _, outer, inner = _split_wrapper(spec)
    params = inspect.signature(usable[inner_name].__init__).parameters
    for opt in inner:
        if opt not in params or opt in ("self", "threat"):
            valid = [*WRAPPERS[name], *(p for p in params if p not in ("self", "threat"))]
            raise SuiteError(f"{key}.{opt}", f"{name} over {inner_name} has no option "
                             f"{opt!r}; its options: {', '.join(valid)}", source)
    try:  # construct once with a dummy threat so a bad value fails here, not mid-run
        build_attack(spec, Threat("linf", 0.1))
    except (TypeError, ValueError) as err:
        raise SuiteError(key, str(err), source) from None


def _masking(t: _Table, dataset: str, check_zoo: bool) -> MaskingSpec:
    surrogate = t.text("surrogate", SURROGATE_AUTO)
    if surrogate not in (SURROGATE_AUTO, SURROGATE_NONE) and check_zoo:

        names = zoo.list()
        if surrogate not in names:
            raise t.error("surrogate", f"unknown zoo model {surrogate!r}; give a zoo model "
                          f"of {dataset!r}, {SURROGATE_AUTO!r} or {SURROGATE_NONE!r}")
        if zoo.get(surrogate).dataset != dataset:
            raise t.error("surrogate", f"zoo model {surrogate!r} is trained on "
                          f"{zoo.get(surrogate).dataset!r}, but the suite's dataset is "
                          f"{dataset!r}")
    return MaskingSpec(enabled=t.flag("enabled", True), follow_up=t.flag("follow_up", False),
                       fast=t.flag("fast", False), n=t.integer("n", 200, minimum=1),
                       surrogate=surrogate)


def default_surrogate(dataset: str) -> str | None:
    """The transfer check's default surrogate: the first standard-trained, plain (no defense,
    no transform) zoo model of ``dataset``, or None when the zoo has none."""

    for name in zoo.list():
        entry = zoo.get(name)
        if entry.dataset == dataset and entry.recipe == "standard":
            return name
    return None


def _explain(t: _Table) -> ExplainSpec:
    spec = ExplainSpec(enabled=t.flag("enabled", bool(t.data)),
                       methods=t.str_list("methods", ("saliency",), EXPLAIN_METHODS.names()),
                       metrics=t.str_list("metrics", ("deletion_insertion",),
                                          EXPLAIN_METRICS.names()),
                       n=t.integer("n", 32, minimum=1), ig_steps=t.integer("ig_steps", 32, minimum=1),
                       maps=t.integer("maps", 4, minimum=0))
    if spec.enabled and not spec.methods:
        raise t.error("methods", "is empty; name at least one method")
    return spec


def _backdoor(t: _Table) -> BackdoorSpec:
    return BackdoorSpec(enabled=t.flag("enabled", bool(t.data)),
                        models=t.str_list("models", ()), defenses=t.flag("defenses", False))


def _curves(t: _Table, threats: tuple[ThreatSpec, ...]) -> CurveSpec:
    models = t.str_list("models", ("ranked",))
    if not models:
        raise t.error("models", "is empty; give 'ranked', 'all' or model keys")
    if len(models) > 1 and set(models) & set(CURVE_MODELS):
        raise t.error("models", f"{' and '.join(CURVE_MODELS)} stand alone; got {list(models)}")
    points = t.integer("points", 10, minimum=1)
    norms = {th.norm for th in threats}
    grids: dict[str, tuple[float, ...]] = {}
    raw = t.raw("eps", None)
    if raw is not None:
        if isinstance(raw, list):  # one grid: only for a suite of one norm
            if len(norms) != 1:
                raise t.error("eps", "a plain list is only for a suite of one norm; give a "
                              "table per norm: eps = { linf = [...], l2 = [...] }")
            raw = {next(iter(norms)): raw}
        if not isinstance(raw, Mapping):
            raise t.error("eps", f"expected a list of numbers or a table norm -> list, got "
                                 f"{_tname(raw)}")
        for norm, values in raw.items():
            key = f"{t.key('eps')}.{norm}"
            if norm not in norms:
                raise SuiteError(key, f"the suite has no {norm!r} threat; its norms: "
                                 f"{', '.join(sorted(norms))}", t.source)
            if not isinstance(values, list) or not values:
                raise SuiteError(key, "expected a non-empty list of numbers", t.source)
            grid = tuple(_number(v, f"{key}[{j}]", t.source) for j, v in enumerate(values))
            if any(e <= 0 for e in grid):
                raise SuiteError(key, f"grid eps must be > 0 (eps 0 is the clean accuracy), "
                                 f"got {list(grid)}", t.source)
            grids[norm] = grid
    attacks: tuple[dict[str, Any], ...] = CURVE_ATTACKS
    if t.has("attacks"):
        attacks = _attacks(_Table({"attacks": t.raw("attacks")}, t.path, t.source),
                           list_key="attacks").attacks
    return CurveSpec(enabled=t.flag("enabled", bool(t.data)), models=models, points=points,
                     eps=grids, attacks=attacks)
def _certify(t: _Table) -> CertifySpec:
    methods = t.str_list("methods", CERTIFY_METHODS, CERTIFY_METHODS)
    if len(set(methods)) != len(methods):
        raise t.error("methods", f"lists a method twice: {list(methods)}")
    time_limit = 10.0
    raw = t.raw("time_limit")
    if raw is not None:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw < float("inf"):
            raise t.error("time_limit", f"expected a number of seconds > 0 (the MILP's limit "
                                        f"per sample), got {raw!r}")
        time_limit = float(raw)
    spec = CertifySpec(enabled=t.flag("enabled", bool(t.data)), methods=methods,
                       time_limit=time_limit, n=t.integer("n", None, minimum=1))
    if spec.enabled and not spec.methods:
        raise t.error("methods", f"is empty; name at least one of {', '.join(CERTIFY_METHODS)}")
    return spec


def _quick(t: _Table) -> QuickSpec:
    eps = None
    if t.has("eps"):
        raw = t.raw("eps")
        raw = raw if isinstance(raw, list) else [raw]
        eps = tuple(_number(e, f"{t.key('eps')}[{i}]", t.source) for i, e in enumerate(raw))
    bs = t.integer("batch_size", None, minimum=1)
    return QuickSpec(n=t.integer("n", 100, minimum=1), batch_size=bs,
                     preset=t.text("preset", "quick", choices=PRESETS.names()), eps=eps,
                     masking_fast=t.flag("masking_fast", True),
                     masking_n=t.integer("masking_n", 100, minimum=1),
                     explain_n=t.integer("explain_n", 8, minimum=1),
                     explain_metrics=t.str_list("explain_metrics", ("deletion_insertion",),
                                                EXPLAIN_METRICS.names()),
                     models=t.str_list("models", ()))


def parse_suite(data: Mapping[str, Any], *, source: str | None = None,
                check_zoo: bool = True) -> Suite:
    """Validate a parsed TOML document (or a stored configuration) into a :class:`Suite`.

    ``check_zoo`` checks zoo names against the registry (off when reading a stored run whose
    models may have been renamed since).
    """

    top = _Table(data, "", source)
    name = top.text("name")
    description = top.text("description", "", allow_empty=True)
    dataset = top.text("dataset", choices=data_mod.names())
    split = top.text("split", "test", choices=data_mod.SPLITS)
    n = top.integer("n", 500, minimum=1)
    batch_size = top.integer("batch_size", 250, minimum=1)
    seed = top.integer("seed", 0, minimum=0)
    device = top.text("device", None)
    if device is not None:

        try:
            select_device(device)
        except ValueError as err:
            raise top.error("device", str(err)) from None
    channels_last = top.flag("channels_last", False)
    data_options = top.raw("data_options", {})
    if not isinstance(data_options, Mapping):
        raise top.error("data_options", f"expected a table, got {_tname(data_options)}")
    models = _models(top.raw("models"), source, dataset, check_zoo)
    threats = _threats(top.raw("threats"), source)
    attacks = _attacks(top.table("attacks"))
    masking_t = top.table("masking")
    masking = _masking(masking_t, dataset, check_zoo)
    explain_t = top.table("explain")
    explain = _explain(explain_t)
    backdoor_t = top.table("backdoor")
    backdoor = _backdoor(backdoor_t)
    curves_t = top.table("curves")
    curves = _curves(curves_t, threats)
    certify_t = top.table("certify")
    certify = _certify(certify_t)
    quick_t = top.table("quick")
    quick = _quick(quick_t)
    for t in (masking_t, explain_t, backdoor_t, curves_t, certify_t, quick_t):
        t.done()
    top.done()
    for i, m in enumerate(quick.models):
        if m not in {s.key for s in models}:
            raise SuiteError(f"quick.models[{i}]", f"{m!r} is not one of the suite's models",
                             source)
    for i, m in enumerate(backdoor.models):
        if m not in {s.key for s in models}:
            raise SuiteError(f"backdoor.models[{i}]", f"{m!r} is not one of the suite's models",
                             source)
    if curves.enabled and "ranked" in curves.models and not masking.enabled:
        raise SuiteError("curves.models", "'ranked' selects by the masking diagnosis, which is "
                         "off ([masking] enabled = false); enable it or list the models",
                         source)
    for i, m in enumerate(curves.models):
        if m not in CURVE_MODELS and m not in {s.key for s in models}:
            raise SuiteError(f"curves.models[{i}]", f"{m!r} is not one of the suite's models "
                             f"(or {' / '.join(repr(c) for c in CURVE_MODELS)})", source)
    return Suite(name=name, description=description, dataset=dataset, split=split, n=n,
                 batch_size=batch_size, seed=seed, device=device, channels_last=channels_last,
                 data_options=dict(data_options),
                 models=models, threats=threats, attacks=attacks, masking=masking,
                 explain=explain, backdoor=backdoor, curves=curves, certify=certify,
                 quick_spec=quick,
                 source=source)


def default_suite_path() -> Path:
    """The default suite shipped with the package."""
    return Path(str(resources.files("unmask.bench").joinpath("suites/default.toml")))


def load_suite(path: str | os.PathLike | None = None, *, check_zoo: bool = True) -> Suite:
    """Read and validate a suite file (``None``: the shipped default suite).

    A name without a path separator or suffix that is not a file is looked up among the
    shipped suites (``"default"``).
    """
    if path is None:
        p = default_suite_path()
    else:
        p = Path(path)
        if not p.exists() and p.suffix == "" and os.sep not in str(path):
            shipped = Path(str(resources.files("unmask.bench").joinpath(f"suites/{path}.toml")))
            if shipped.exists():
                p = shipped
    if not p.exists():
        raise FileNotFoundError(f"suite file not found: {p}")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise SuiteError("(syntax)", f"not valid TOML: {err}", str(p)) from None
    return parse_suite(doc, source=str(p), check_zoo=check_zoo)


def resolve_user_model(spec: ModelSpec):
    """Import ``module:function`` (the working directory on ``sys.path``, as ``python -m``
    does) and call it with the spec's kwargs for an ``nn.Module`` in eval mode;
    ``robustbench:<dataset>/<threat>/<name>`` loads a local RobustBench-style checkpoint
    (:func:`unmask.bench.zoo.robustbench.load_spec`, kwargs ``model_dir``, ``arch``)."""
    if spec.name.startswith(ROBUSTBENCH_PREFIX):

        return load_spec(spec.name, spec.kwargs, device="cpu")

    return build_user_model(spec.name, spec.kwargs)
