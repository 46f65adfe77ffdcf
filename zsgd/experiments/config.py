"""The experiment file: one problem, a list of arms, every value checked up front.

::

    name: compare-small
    problem:            # what every arm shares: model, data, split, seed (so the
      model: logreg     # same initial weights and shards), and default
      data: embedded    # hyper-parameters and stop rule (any `zsgd train` option)
      split: iid
      seed: 0
      batch_size: 32
      lr: 0.05
      optimizer: sgd
      steps: 300
      eval_every: 25
    target: 0.75        # accuracy for the "time to target" column (default: problem's target_acc, else 0.8)
    defaults:           # arm settings shared by every arm where they apply
      workers: 8
      compute: 5ms
      latency: 5ms
    arms:
      - {name: async, algo: async}
      - {name: sync, algo: sync}
      - {name: dsgd-ring, algo: dsgd, topology: ring}
      - {name: cadmm, algo: cadmm, topology: ring, rho: 0.1, primal_steps: 5}

Arm keys: ``name`` (required, unique), ``mode`` (``sim`` default, or ``run``:
real processes), ``algo`` (async, sync, ssp:S, localsgd:K, ksync:K, kasync:K, dsgd, dsgt, cadmm),
``workers``, ``compress``; the world (as in ``zsgd sim``): ``latency``,
``bandwidth``, ``loss``, ``stragglers`` (also emulated in ``run`` mode),
``latency_up``, ``latency_down``, ``compute``, ``failures``, ``detect``,
``broker_time``, ``broker_bandwidth``, ``retransmit`` (sim only);
``staleness_lr`` (centralized); ``heartbeat``, ``timeout`` (run only);
``topology`` and the rule's hyper-parameters (``alpha0``, ``mu``, ``gamma`` for
dsgd/dsgt; ``rho``, ``rho_scaling``, ``primal_steps`` for cadmm); and per-arm
overrides of the problem's hyper-parameters (``lr``, ``batch_size``,
``optimizer``, ``momentum``, ``weight_decay``, ``clip_norm``, ``steps``,
``epochs``, ``time``, ``target_acc``, ``target_ppl``, ``eval_every``,
``log_every``). A language model's problem may also set ``bptt`` and ``tokens``.

An arm's own key that does not apply to it (``rho`` on a dsgd arm,
``compute`` on a run arm) is an error; a ``defaults`` key applies only
where it makes sense. Why strict: a silently ignored key is a comparison
that was not the one you meant.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zsgd.core.config import TrainConfig, model_defaults
from zsgd.errors import ZsgdError
from zsgd.core.yaml_loader import Marked, load_marked
from zsgd.network.knobs import RUN, SIM, Knob, all_knobs

TOP_KEYS = ("name", "description", "problem", "target", "defaults", "arms")
SHARED_KEYS = ("model", "data", "data_dir", "image_size", "grayscale", "split", "seed", "bptt", "tokens")
OVERRIDE_KEYS = ("batch_size", "lr", "lr_schedule", "optimizer", "momentum", "weight_decay", "clip_norm", "epochs", "steps", "time",
                 "target_acc", "target_ppl", "eval_every", "log_every")
PROBLEM_KEYS = SHARED_KEYS + OVERRIDE_KEYS
CENTRAL_KEYS = ("staleness_lr", "compress_replies", "servers")
RUN_KEYS = ("heartbeat", "timeout")
DECENTRAL_KEYS = ("topology", "alpha0", "mu", "gamma", "rho", "rho_scaling", "primal_steps")
BASE_KEYS = ("name", "mode", "algo", "workers", "compress")
MODES = (SIM, RUN)
DEFAULT_WORKERS = 8  # the ready examples' scale: enough for a ring to lag, small enough for a laptop


@dataclass
class ArmSpec:
    """One validated arm; ``opts`` is SimOptions, DecentralizedOptions or RunOptions."""

    index: int
    name: str
    mode: str
    algo: str
    cfg: TrainConfig
    opts: Any
    settings: dict[str, Any]  # the arm's effective keys (defaults merged), for arm.json and the table
    line: int | None = None

    @property
    def decentralized(self) -> bool:
        from zsgd.decentralized.rules import is_decentralized

        return is_decentralized(self.algo)

    @property
    def dirname(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-") or "arm"
        return f"{self.index:02d}-{slug}"[:100]


@dataclass
class ExperimentSpec:
    path: Path
    text: str
    name: str
    description: str
    problem: dict[str, Any]
    cfg: TrainConfig  # the problem as a validated TrainConfig (arms add their overrides)
    target: float
    arms: list[ArmSpec] = field(default_factory=list)


def arm_keys() -> tuple[str, ...]:
    """Every key an arm may have (read at call time: a knob added to ``zsgd.network.knobs`` is a key at once)."""
    return BASE_KEYS + tuple(_file_knobs()) + CENTRAL_KEYS + RUN_KEYS + DECENTRAL_KEYS + OVERRIDE_KEYS


def _file_knobs() -> dict[str, Knob]:
    """The world's keys (``zsgd.network.knobs``), each with the arm modes that take it."""
    return {k.name: k for k in all_knobs() if k.file}


def _unknown(doc: Marked, where: str, key: Any, known: tuple[str, ...], *path: Any) -> ZsgdError:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return doc.error(f"{where}: unknown key {key!r}{hint}", *path)


def _mapping(doc: Marked, value: Any, what: str, *path: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error(f"{what} must be a mapping of key: value, got {type(value).__name__}", *path)
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(v: Any) -> str:
    """YAML scalars to the spec text the parsers read (0 -> "0", 0.01 -> "0.01", True -> "true")."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _number(name: str, positive: bool = True) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if positive else v >= 0):
            raise ZsgdError(f"must be a {'positive' if positive else 'non-negative'} number, got {v!r}")
        return v
    return check


def _workers(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ZsgdError(f"must be a whole number >= 1, got {v!r}")
    return v


def _mode(v: Any) -> str:
    if v not in MODES:
        raise ZsgdError(f"must be one of {', '.join(MODES)}, got {v!r}")
    return v


def _algo(v: Any) -> str:
    from zsgd.algorithms import parse_algo
    from zsgd.decentralized.rules import is_decentralized

    if not isinstance(v, str):
        raise ZsgdError(f"must be a string such as async, sync, ssp:4, localsgd:8, dsgd, dsgt or cadmm, got {v!r}")
    if not is_decentralized(v):
        parse_algo(v)
    elif ":" in v:
        raise ZsgdError(f"{v!r}: give {v.partition(':')[0]}'s options as keys of the arm (topology, alpha0, rho ...)")
    return v.strip()


def _value_checkers() -> dict[str, Callable[[Any], Any]]:
    """One parser per arm key, so a bad value is reported at its own line."""
    from zsgd.algorithms import parse_staleness_lr
    from zsgd.compression import make_codec
    from zsgd.decentralized.rules import DecentralizedParams
    from zsgd.network import split_specs

    def param(key: str) -> Callable[[Any], Any]:
        return lambda v: DecentralizedParams(**{key: v}).validate() and v

    def one(key: str, parse: Callable[[str], Any], split: Callable[[str], list[str]]) -> Callable[[Any], Any]:
        """Parse one spec; a list (which ``zsgd sim`` turns into arms) is refused here."""
        def check(v: Any) -> Any:
            if len(split(_text(v))) > 1:
                raise ZsgdError(f"{_text(v)!r} is a list: an arm takes one value per key (make one arm per value)")
            return parse(_text(v))
        return check

    def codec(key: str) -> Callable[[Any], Any]:
        return one(key, lambda t: make_codec(t, 1) and t, lambda t: split_specs(t, key, units=False))

    def world(k: Knob) -> Callable[[Any], Any]:
        return one(k.name, lambda t: k.parse_value(t, k.name), lambda t: k.split(t, k.name))

    return {
        "name": lambda v: v, "mode": _mode, "algo": _algo, "workers": _workers,
        "compress": codec("compress"), "compress_replies": codec("compress_replies"), "servers": _servers,
        **{k.name: world(k) for k in _file_knobs().values()},
        "staleness_lr": parse_staleness_lr, "heartbeat": _number("heartbeat"), "timeout": _number("timeout"),
        "topology": lambda v: v if isinstance(v, str) else _fail(f"must be a string such as ring or random-regular:4, got {v!r}"),
        **{k: param(k) for k in DECENTRAL_KEYS[1:]},
    }


def _fail(message: str) -> Any:
    raise ZsgdError(message)


def _applies(key: str, mode: str, algo: str) -> str | None:
    """None if ``key`` applies to an arm of this mode and algorithm, else why not."""
    from zsgd.decentralized.rules import PARAMS_OF, is_decentralized

    dec = is_decentralized(algo)
    world = _file_knobs().get(key)
    if world is not None and mode not in world.file:
        return f"applies to {' and '.join(world.file)} arms only"
    if key in RUN_KEYS and mode != "run":
        return "applies to run arms only"
    if key in CENTRAL_KEYS and dec:
        return "applies to centralized algorithms only"
    if key == "failures" and dec:
        return "failures are not modelled for decentralized arms"
    if key in DECENTRAL_KEYS:
        if not dec:
            return f"applies to decentralized algorithms (dsgd, dsgt, cadmm), not {algo}"
        if key != "topology" and key not in PARAMS_OF[algo]:
            users = [a for a, ks in PARAMS_OF.items() if key in ks]
            return f"is a {'/'.join(users)} parameter, not a {algo} one"
    return None


def _problem_cfg(doc: Marked, problem: dict[str, Any], name: str) -> TrainConfig:
    values = {("time_limit" if k == "time" else k): v for k, v in problem.items()}
    # a model family's own defaults (the language model's optimizer, lr ...) where the file sets none
    values = model_defaults(str(values.get("model", TrainConfig.model))) | values
    try:
        return TrainConfig.from_dict(values | {"name": name}).validate()
    except (ZsgdError, TypeError) as exc:
        bad = _blame(problem, lambda k, v: TrainConfig.from_dict({("time_limit" if k == "time" else k): v}).validate())
        raise doc.error(f"problem: {bad[0] + ': ' if bad else ''}{exc}", "problem", *(bad[:1])) from None


def _blame(values: dict[str, Any], check: Callable[[str, Any], Any]) -> list[str]:
    """The first key whose value fails ``check`` on its own (to point at its line)."""
    for k, v in values.items():
        try:
            check(k, v)
        except (ZsgdError, TypeError):
            return [k]
    return []


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Parse and validate the whole file (every arm) before anything runs."""
    doc = load_marked(Path(path))
    top = _mapping(doc, doc.data, "the experiment file")
    for k in top:
        if k not in TOP_KEYS:
            raise _unknown(doc, "top level", k, TOP_KEYS, k)
    name = top.get("name") or Path(path).stem
    if not isinstance(name, str) or len(name) > 100 or not name.isprintable():
        raise doc.error(f"name must be a string of at most 100 printable characters, got {_short(name)}", "name")
    description = top.get("description")
    if description is not None and not isinstance(description, str):
        raise doc.error(f"description must be text, got {type(description).__name__} {_short(description)}", "description")
    problem = _mapping(doc, top.get("problem"), "problem", "problem")
    for k in problem:
        if k not in PROBLEM_KEYS:
            raise _unknown(doc, "problem", k, PROBLEM_KEYS, "problem", k)
    base_cfg = _problem_cfg(doc, problem, name)
    target = top.get("target", 0.8 if base_cfg.target_acc is None else base_cfg.target_acc)  # one target: the stop rule's, if any
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise doc.error(f"target must be an accuracy in (0, 1], got {target!r}", "target")
    defaults = _mapping(doc, top.get("defaults"), "defaults", "defaults")
    arm_keys_no_name = tuple(k for k in arm_keys() if k != "name")
    for k in defaults:
        if k not in arm_keys_no_name:
            if k in SHARED_KEYS:
                raise doc.error(f"defaults: {k!r} belongs under problem: (every arm shares it)", "defaults", k)
            raise _unknown(doc, "defaults", k, arm_keys_no_name, "defaults", k)
    checkers = _value_checkers()
    for k, v in defaults.items():
        _check_value(doc, checkers, "defaults", k, v, ("defaults", k))
    arms_raw = top.get("arms")
    if not isinstance(arms_raw, list) or not arms_raw:
        raise doc.error("arms must be a non-empty list of arms (each a mapping with at least a name)", "arms")
    from zsgd.simulation.plan import check_arm_count

    try:
        check_arm_count(len(arms_raw), "the file's arms: list")  # before each is parsed
    except ZsgdError as exc:
        raise doc.error(str(exc), "arms") from None
    spec = ExperimentSpec(Path(path), doc.text, name, description or "", problem, base_cfg, float(target))
    seen: dict[str, int] = {}
    for i, raw in enumerate(arms_raw):
        arm = _arm(doc, i, _mapping(doc, raw, f"arms[{i}]", "arms", i), defaults, base_cfg, float(target), checkers)
        if arm.name in seen:
            raise doc.error(f"arms[{i}]: duplicate arm name {arm.name!r} (also arms[{seen[arm.name]}])", "arms", i, "name")
        seen[arm.name] = i
        spec.arms.append(arm)
    return spec


def _check_value(doc: Marked, checkers: dict[str, Callable[[Any], Any]], where: str, key: str, value: Any,
                 path: tuple[Any, ...]) -> None:
    check = checkers.get(key)  # problem overrides are checked as a TrainConfig, see _arm
    try:
        if check is not None:
            check(value)
    except ZsgdError as exc:
        raise doc.error(f"{where}: bad value for {key!r}: {exc}", *path) from None


def _arm(doc: Marked, i: int, raw: dict[str, Any], defaults: dict[str, Any], base_cfg: TrainConfig, target: float,
         checkers: dict[str, Callable[[Any], Any]]) -> ArmSpec:
    path = ("arms", i)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or not name.isprintable():
        raise doc.error(f"arms[{i}]: every arm needs a name (a non-empty string of at most 100 printable characters)", *path)
    where = f"arms[{i}] {name!r}"
    for k, v in raw.items():
        if k in SHARED_KEYS:
            raise doc.error(f"{where}: {k!r} cannot differ between arms (every arm shares the initial weights and the "
                            f"shards); set it under problem:", *path, k)
        if k not in arm_keys():
            raise _unknown(doc, where, k, arm_keys(), *path, k)
        _check_value(doc, checkers, where, k, v, path + (k,))
    mode = raw.get("mode", defaults.get("mode", "sim"))
    algo = _algo(raw.get("algo", defaults.get("algo", "async")))
    for k in raw:
        why = _applies(k, mode, algo)
        if why:
            raise doc.error(f"{where}: {k!r} {why}", *path, k)
    merged = {k: v for k, v in defaults.items() if _applies(k, mode, algo) is None} | raw
    merged |= {"mode": mode, "algo": algo, "workers": merged.get("workers", DEFAULT_WORKERS)}
    key_path = {k: (path + (k,) if k in raw else ("defaults", k)) for k in merged}
    overrides = {k: merged[k] for k in OVERRIDE_KEYS if k in merged}
    try:
        cfg = TrainConfig.from_dict(base_cfg.to_dict() | {("time_limit" if k == "time" else k): v for k, v in overrides.items()}
                                    | {"name": f"{base_cfg.name}-{name}"}).validate()
    except (ZsgdError, TypeError) as exc:
        bad = _blame(overrides, lambda k, v: TrainConfig.from_dict(base_cfg.to_dict() | {("time_limit" if k == "time" else k): v}).validate())
        raise doc.error(f"{where}: {bad[0] + ': ' if bad else ''}{exc}", *(key_path[bad[0]] if bad else path)) from None
    try:
        opts = _options(mode, algo, merged, cfg, target)
    except ZsgdError as exc:
        culprit = next((k for k in ("mode", "topology", "latency", "compress", "workers") if k in merged and k in str(exc)), None)
        raise doc.error(f"{where}: {exc}", *(key_path[culprit] if culprit else path)) from None
    return ArmSpec(i, name.strip(), mode, algo, cfg, opts, dict(merged), doc.line(*path))


def _servers(v: Any) -> int:
    from zsgd.core.ranges import check_servers

    check_servers(v)
    return v


def _options(mode: str, algo: str, s: dict[str, Any], cfg: TrainConfig, target: float) -> Any:
    """The callee's options object for one arm (every spec parsed now, nothing run)."""
    from zsgd.decentralized.rules import DecentralizedParams, is_decentralized

    n = s["workers"]
    if mode == "run":
        from zsgd.runtime.run_options import DECENTRALIZED_FLAGS, RunOptions

        kw = {"heartbeat": s["heartbeat"]} if "heartbeat" in s else {}
        if "timeout" in s:
            kw["timeout"] = s["timeout"]
        if is_decentralized(algo):  # real processes relaying PEER messages through the broker (zsgd.runtime.server.relay)
            kw |= {k: s[k] for k in DECENTRALIZED_FLAGS if k in s}
            from zsgd.decentralized.topology import parse_topology

            parse_topology(str(s.get("topology", "ring")), n, cfg.seed)  # a topology that cannot be built on n nodes fails now
        emulated = {k.run_name: _opt(s, k.name) for k in _file_knobs().values() if RUN in k.file}  # --inject-latency ...
        return RunOptions.from_flags(dict(n_proc=n, algo=algo, staleness_lr=s.get("staleness_lr", "off"), compress=_text(s.get("compress", "none")),
                                          compress_replies=_text(s.get("compress_replies", "none")), servers=s.get("servers", 1),
                                          show=False, **emulated, **kw)).validate()
    from zsgd.simulation.sweep import SweepSpec, build_arms

    knobs = _file_knobs()
    grid = {k: _text(s[k]) for k in ("workers", *knobs, "compress", "compress_replies", "servers")
            if k in s and (k not in knobs or knobs[k].sweep)}
    extra = {k: _text(s[k]) for k in knobs if k in s and not knobs[k].sweep}
    central = not is_decentralized(algo)
    sweep = SweepSpec(grid=grid | {"algo": algo if central else "sync"}, staleness_lr=s.get("staleness_lr", "off"), target=target,
                      **extra)
    arms = build_arms(sweep)
    if len(arms) != 1:
        lists = [k for k, v in grid.items() if len(str(v).split(",")) > 1 and k != "failures"]
        raise ZsgdError(f"one value per key in an arm (make one arm per value); {', '.join(lists) or 'a key'} has a list")
    opts = arms[0].opts
    if central:
        return opts
    from zsgd.simulation.decentralized import DecentralizedOptions

    params = DecentralizedParams(**{k: s[k] for k in DECENTRAL_KEYS[1:] if k in s})
    dopts = DecentralizedOptions.like(opts, algo, str(s.get("topology", "ring")), params)
    dopts.graph(cfg.seed)  # a topology that cannot be built on n nodes fails now
    return dopts


def _opt(s: dict[str, Any], key: str) -> str | None:
    return _text(s[key]) if key in s else None

