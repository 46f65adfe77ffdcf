"""Flags shared by every training command (train, run, sim, worker ...).

One decorator declares them once, and one function turns parsed flags (and
an optional ``--config FILE.yaml``) into a validated ``TrainConfig``; flags
given on the command line win over the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from zsgd.core.config import OPTIMIZERS, TrainConfig, model_defaults
from zsgd.errors import ZsgdError
from zsgd.core.schedule import LR_SCHEDULES

# (flag, TrainConfig field, click kwargs)
TRAINING_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", dict(default="cnn", show_default=True, help="logreg, mlp, cnn, lenet5, lstm[:embed=E,hidden=H,layers=L] (a language model; its defaults: --batch-size 32 streams, --optimizer adam, --lr 0.002, --clip-norm 1), package.module:factory for your own model, or torch:package.module:factory for a PyTorch module (pip install 'zsgd[torch]').")),
    ("--data", "data", dict(default="default", show_default=True, help="fashion-mnist, mnist, embedded, imagefolder:PATH, text[:FILE]; default: full Fashion-MNIST if installed, else the embedded subset (--model lstm: the embedded text corpus).")),
    ("--data-dir", "data_dir", dict(default=None, type=click.Path(file_okay=False), help="Directory holding the data set's files.")),
    ("--image-size", "image_size", dict(default=64, show_default=True, type=int, help="Side length images are resized to (imagefolder).")),
    ("--grayscale/--rgb", "grayscale", dict(default=False, help="Colour mode for imagefolder data.")),
    ("--split", "split", dict(default="iid", show_default=True, help="How data is sharded over workers: iid, shards, dirichlet:ALPHA, classes:K.")),
    ("--batch-size", "batch_size", dict(default=64, show_default=True, type=int, help="Mini-batch size per step (per worker).")),
    ("--lr", "lr", dict(default=0.05, show_default=True, type=float, help="Learning rate.")),
    ("--lr-schedule", "lr_schedule", dict(default="auto", show_default=True, type=click.Choice(LR_SCHEDULES),
                                          help="Decay --lr to 0 over the run's --epochs/--steps/--time. auto: cosine for "
                                               "train/async/sync/ssp, constant for localsgd, dsgd, dsgt, cadmm.")),
    ("--optimizer", "optimizer", dict(default="momentum", show_default=True, type=click.Choice(OPTIMIZERS))),
    ("--momentum", "momentum", dict(default=0.9, show_default=True, type=float)),
    ("--weight-decay", "weight_decay", dict(default=0.0, show_default=True, type=float)),
    ("--clip-norm", "clip_norm", dict(default=None, type=float, help="Clip each gradient to this L2 norm.")),
    ("--seed", "seed", dict(default=0, show_default=True, type=int, help="Seeds initial weights, shuffling, shards and dropout.")),
    ("--epochs", "epochs", dict(default=None, type=float, help="Stop after this many passes over the training set.")),
    ("--steps", "steps", dict(default=None, type=int, help="Stop after this many (central) updates.")),
    ("--time", "time_limit", dict(default=None, type=float, help="Stop after this many seconds.")),
    ("--target-acc", "target_acc", dict(default=None, type=float, help="Stop once test accuracy reaches this (0-1).")),
    ("--target-ppl", "target_ppl", dict(default=None, type=float, help="Language models: stop once test perplexity is at most this.")),
    ("--bptt", "bptt", dict(default=64, show_default=True, type=int, help="Language models: tokens per sequence; the hidden state carries over between a worker's consecutive batches.")),
    ("--tokens", "tokens", dict(default="chars", show_default=True, type=click.Choice(("chars", "bytes", "words")), help="Text data: what one token is.")),
    ("--eval-every", "eval_every", dict(default=0, show_default=True, type=int, help="Evaluate every N updates (0: about 10 times per run, at least once per epoch).")),
    ("--log-every", "log_every", dict(default=20, show_default=True, type=int, help="Log the mean train loss every N updates.")),
    ("--diverge-factor", "diverge_factor", dict(default=100.0, show_default=True, type=float,
                                                 help="Stop as diverged when the train loss stays above this times its start for 3 log windows (0: off; non-finite losses always stop).")),
    ("--name", "name", dict(default=None, help="Run name, used in the run directory's name.")),
]


def training_options(func: Callable) -> Callable:
    """The TRAINING_FLAGS with their shared defaults (train, run, broker, worker)."""
    return training_options_with()(func)


def training_options_with(**defaults: Any) -> Callable[[Callable], Callable]:
    """The TRAINING_FLAGS with some defaults replaced (by ``TrainConfig`` field name).

    For ``zsgd sim`` alone: its default model is the one a laptop can simulate
    for many workers in minutes (see ``zsgd.commands.simulate``). Every
    hyper-parameter default stays shared, so a simulation and a run of the same
    flags train the same way.
    """
    fields = {field for _flag, field, _kw in TRAINING_FLAGS}
    unknown = sorted(set(defaults) - fields)
    if unknown:
        raise ValueError(f"not training flags: {', '.join(unknown)}")

    def decorate(func: Callable) -> Callable:
        for flag, field, kwargs in reversed(TRAINING_FLAGS):
            names = [flag] if "/" in flag else [flag, field]
            func = click.option(*names, **(kwargs | ({"default": defaults[field]} if field in defaults else {})))(func)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, is_eager=True,
                            callback=load_config_file,
                            help="YAML file of options (any flag of this command, e.g. 'workers: 64'); flags override it.")(func)

    return decorate


def load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """The eager ``--config`` callback: the file's options become ``ctx.default_map``, read before the
    other flags, so every option of the command can be set in it and a flag still wins."""
    if value is not None and not ctx.resilient_parsing:
        ctx.default_map = (ctx.default_map or {}) | load_yaml_config(Path(value), ctx)
    return value


def decentralized_options(func: Callable) -> Callable:
    """Flags of --algo dsgd|dsgt|cadmm, named as in experiment files (topology, alpha0, mu, rho ...)."""
    opts = [
        click.option("--topology", default=None, metavar="SPEC", help="Decentralized graph (default ring): ring, torus[:RxC], wheel, complete, random-regular:D, erdos-renyi:P."),
        click.option("--alpha0", default=None, type=float, help="dsgd/dsgt step alpha_k = alpha0 / (1 + mu k) (default: --lr)."),
        click.option("--mu", default=None, type=float, help="dsgd/dsgt step decay (default 0: constant)."),
        click.option("--gamma", default=None, type=float, help="dsgd/dsgt consensus step in (0, 1] (default 1; 0.2 with --compress)."),
        click.option("--rho", default=None, type=float, help="cadmm penalty (default 0.1)."),
        click.option("--rho-scaling", default=None, type=float, help="cadmm: rho is multiplied by this each round (default 1)."),
        click.option("--primal-steps", default=None, type=int, help="cadmm local optimizer steps per round (default 5)."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def sim_network_options(func: Callable) -> Callable:
    """``zsgd sim``'s flags of the simulated world, one per knob of ``zsgd.network.knobs`` (named as the
    experiment file's keys: --latency-up is latency_up); ``pop_network`` takes their values back out."""
    from zsgd.network.knobs import all_knobs

    for k in reversed(all_knobs()):
        kw: dict[str, Any] = dict(default=k.default, help=k.sim_help, show_default=k.default is not None)
        if k.multiple:
            kw = dict(multiple=True, help=k.sim_help)
        func = click.option(k.flag, metavar=k.metavar, **kw)(func)
    return func


def run_emulation_options(func: Callable) -> Callable:
    """``zsgd run``'s flags that inject the world into a real run (--inject-latency ...): the knobs of
    ``zsgd.network.knobs`` with a ``run_flag``, each named as its ``EmulationOptions`` field."""
    from zsgd.network.knobs import emulated

    for k in reversed(emulated()):
        func = click.option(k.run_flag, default=None, metavar=k.run_metavar, help=k.run_help)(func)
    return func


def pop_network(params: dict[str, Any]) -> dict[str, Any]:
    """Take the ``sim_network_options`` values out of a command's params: ``{knob name: text}``."""
    from zsgd.network.knobs import all_knobs

    return {k.name: params.pop(k.name) for k in all_knobs()}


def pop_decentralized(params: dict[str, Any]) -> dict[str, Any]:
    """Take the ``decentralized_options`` values out of a command's params (their field names in ``RunOptions``)."""
    from zsgd.runtime.run_options import DECENTRALIZED_FLAGS

    return {k: params.pop(k) for k in DECENTRALIZED_FLAGS}


def build_config(ctx: click.Context, params: dict[str, Any], default_name: str, defaulted: set[str] | None = None) -> TrainConfig:
    """Merge YAML file values with flags (explicit flags win) and validate.

    The ``--config`` file was read into ``ctx.default_map`` when it was parsed
    (``zsgd.commands.config_file``), so ``params`` already hold its values,
    with the source ``DEFAULT_MAP``. ``defaulted``, when given, receives the
    fields that neither a flag nor the file set: the ones ``zsgd run`` may
    scale to its number of workers.
    """
    values: dict[str, Any] = {}
    unset: set[str] = set()
    for _flag, field, _kw in TRAINING_FLAGS:
        explicit = ctx.get_parameter_source(field) not in (ParameterSource.DEFAULT, None)
        if not explicit and field not in values:
            unset.add(field)
        if explicit or field not in values:
            values[field] = params[field]
    for field, value in model_defaults(values["model"]).items():
        if field in unset:  # a model family's own defaults, where the user chose nothing
            values[field] = value
    if defaulted is not None:
        defaulted.update(unset)
    if values.get("name") is None:
        values["name"] = default_name
    return TrainConfig.from_dict(values).validate()


def load_yaml_config(path: Path, ctx: click.Context | None = None) -> dict[str, Any]:
    """The options in a ``--config`` file, each type-checked, by parameter name; errors name the file and line.

    Read like an experiment file (``zsgd.core.yaml_loader``): no aliases, no
    duplicate keys, UTF-8, a size cap. With ``ctx``, every other option of
    its command may be set too (``zsgd.commands.config_file``).
    """
    from zsgd.commands.config_file import cast_option, option_keys

    from zsgd.core.config import check_field
    from zsgd.core.yaml_loader import load_marked

    doc = load_marked(path, what="config file")
    if doc.data is None:
        return {}
    if not isinstance(doc.data, dict):
        raise doc.error(f"expected a mapping of option: value, got {type(doc.data).__name__}")
    known = {field for _f, field, _k in TRAINING_FLAGS}
    others = {k: p for k, p in option_keys(ctx.command).items() if p.name not in known} if ctx is not None else {}
    data: dict[str, Any] = {}
    for key, value in doc.data.items():
        field = str(key).replace("-", "_")
        field = "time_limit" if field == "time" else field
        if field in others:
            name = str(others[field].name)
            if name in data:
                raise doc.error(f"{key!r} repeats an option given above (under another of its names)", key)
            try:
                data[name] = cast_option(ctx, others[field], str(key), value)  # type: ignore[arg-type]
            except ZsgdError as exc:
                raise doc.error(str(exc), key) from None
            continue
        if field not in known:
            import difflib

            names = sorted({k.replace("_limit", "") for k in known} | set(others))
            close = difflib.get_close_matches(str(key).replace("-", "_"), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise doc.error(f"unknown key {str(key)[:60]!r}{hint}", key)
        if field in data:
            raise doc.error(f"{key!r} repeats an option given above (time and time_limit are the same option)", key)
        try:
            check_field(field, value)
        except ZsgdError as exc:
            message = str(exc)
            flag = "--" + ("time" if field == "time_limit" else field.replace("_", "-"))
            raise doc.error(message.replace(flag, str(key), 1) if message.startswith(flag) else f"{key}: {message}", key) from None
        data[field] = value
    return data
