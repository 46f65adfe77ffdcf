"""``--config FILE.yaml`` for every flag of a command, not only the training ones.

Why: a file that can set ``model: mlp`` but not ``workers: 64`` (``zsgd
sim``) or ``n_proc: 4`` (``zsgd run``) is half a configuration, and its error
("unknown key 'workers'; did you mean 'tokens'?") sends the user the wrong
way. The file's values become the command's ``default_map``, set by an eager
callback (``zsgd.commands.options.load_config_file``) before click reads the other flags, so every flag given on the
command line still wins and click's parameter sources tell a file's value
(``DEFAULT_MAP``) from a built-in default.

Training options are type-checked by ``zsgd.core.config.check_field`` (see
``load_yaml_config``); the command's other options here, strictly: a whole
number is an int in the file (click would turn 3.5 into 3), a switch is
true or false, a comma-list flag may also be a YAML list. Errors name the
file and line.
"""

from __future__ import annotations

from typing import Any

import click

from zsgd.errors import ZsgdError


def option_keys(command: click.Command) -> dict[str, click.Option]:
    """The keys a config file may use for ``command``'s own options: each long flag without its leading
    dashes (``n_proc``; the loader reads ``n-proc`` as the same key), and the parameter's name;
    hidden options and ``--config`` itself excluded."""
    keys: dict[str, click.Option] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "config_file" or param.hidden:
            continue
        for flag in param.opts:
            if flag.startswith("--"):
                keys[flag[2:].replace("-", "_")] = param
        keys.setdefault(str(param.name), param)
    return keys


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def cast_option(ctx: click.Context, param: click.Option, key: str, value: Any) -> Any:
    """A file's ``value`` for ``param`` as click would have it from the command line; ZsgdError if it is not one."""
    if param.is_flag and not param.multiple:
        if not isinstance(value, bool):
            raise ZsgdError(f"{key} must be true or false, got {_show(value)}")
        return value
    if param.multiple:  # a repeatable flag (zsgd sim --latency-worker): one value or a list of them
        items = value if isinstance(value, list) else [value]
        if not all(_scalar(v) for v in items):
            raise ZsgdError(f"{key} must be a value or a list of values, got {_show(value)}")
        return [_cast_one(ctx, param, key, v) for v in items]
    if isinstance(value, list) and isinstance(param.type, click.types.StringParamType) and value and all(_scalar(v) for v in value):
        value = ",".join(str(v) for v in value)  # a comma-list flag (zsgd sim --latency) as a YAML list
    return _cast_one(ctx, param, key, value)


def _cast_one(ctx: click.Context, param: click.Option, key: str, value: Any) -> Any:
    kind = param.type
    if not _scalar(value):
        raise ZsgdError(f"{key} must be a single value, got {_show(value)}")
    if isinstance(kind, click.types.IntParamType) and not isinstance(value, int):
        raise ZsgdError(f"{key} must be a whole number, got {_show(value)}")
    if isinstance(kind, click.types.FloatParamType) and not isinstance(value, (int, float)):
        raise ZsgdError(f"{key} must be a number, got {_show(value)}")
    if isinstance(kind, (click.types.StringParamType, click.Choice, click.Path)):
        value = str(value)  # workers: 8 means the flag's text "8"
    try:
        return kind.convert(value, param, ctx)
    except click.BadParameter as exc:
        raise ZsgdError(f"{key}: {exc.message}") from None


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
