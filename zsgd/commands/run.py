"""``zsgd run`` and ``zsgd broker``: a broker and the workers it serves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from zsgd.commands.options import build_config, decentralized_options as _decentralized_options, run_emulation_options, training_options
from zsgd.commands.remote import pop_ssh_flags, remote_run_options, secure_options
from zsgd.errors import RunDiverged, ZsgdError
from zsgd.runtime.launch.base import LAUNCHERS

if TYPE_CHECKING:
    from zsgd.runtime.run_options import RunOptions


def _runtime_options(func):
    opts = [
        click.option("--algo", default="async", show_default=True, help="async, sync, ssp:S, localsgd:K, ksync:K, kasync:K; or decentralized dsgd, dsgt, cadmm."),
        click.option("--port", default=0, show_default=True, type=int, help="Broker port (0 picks a free one)."),
        click.option("--host", default=None, help="Interface the broker listens on (default 127.0.0.1; with --remote, the advertised address)."),
        click.option("--heartbeat", default=1.0, show_default=True, type=float, help="Seconds between heartbeats."),
        click.option("--timeout", default=3.0, show_default=True, type=float, help="Seconds of silence before a peer is declared dead (3 heartbeats)."),
        click.option("--shared-memory/--no-shared-memory", default=None,
                     help="Workers on the broker's machine (and on a range server's) move gradients and weights through /dev/shm "
                          "instead of TCP [default: on, unless ZSGD_SHARED_MEMORY=0]."),
        click.option("--staleness-lr", type=click.Choice(["off", "scalar", "per-coordinate"]), default="off", is_flag=False, flag_value="scalar",
                     help="Divide each async update's step by its staleness (scalar; the bare flag), or per coordinate (AdaComp)."),
        click.option("--compress", default="none", show_default=True, help="Worker->broker codec: none, topk:FRACTION, adacomp:BIN, qsgd:8|4."),
        click.option("--compress-replies", default="none", show_default=True,
                     help="Broker->worker replies as compressed weight deltas (same codecs), e.g. topk:0.05 or qsgd:8."),
        click.option("--servers", default=1, show_default=True, type=int,
                     help="Split the model over K parameter-server processes (contiguous ranges, one port and core each); "
                          "workers push and pull every range at once."),
        click.option("--start-wait", default=10.0, show_default=True, type=float,
                     help="Hold training until every worker is ready, at most this many seconds after the first (0: start at once)."),
        click.option("--eval-interval", default=0.0, show_default=True, type=float, help="Also evaluate every N seconds (0: off)."),
        run_emulation_options,  # --inject-latency ... --stragglers: zsgd.network.knobs
        click.option("--checkpoint-every", default=500, show_default=True, type=int, help="Checkpoint every N updates (0: off)."),
        click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (default runs/<time>-<name>/)."),
        click.option("--quiet", "-q", is_flag=True, help="No live view."),
        click.option("--tensorboard", is_flag=True, help="Also write TensorBoard event files to RUN_DIR/tensorboard (needs tensorboardX)."),
        click.option("--plots/--no-plots", default=True, show_default=True,
                     help="Draw the run's PNGs at its end (--no-plots saves about a second; 'zsgd plot RUN_DIR --out RUN_DIR' draws them later)."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _print_run_summary(summary: dict) -> None:
    from zsgd.output.live import stderr_console, summary_table

    keys = ("test_accuracy", "test_loss", "test_perplexity", "train_loss", "updates", "samples", "epochs", "wall_s", "samples_per_s",
            "tokens_per_s", "staleness_mean",
            "staleness_max", "consensus_error", "rejected_messages", "refused_clients", "worker_deaths", "stop_reason", "run_dir")
    stderr_console.print(summary_table("summary", {k: summary[k] for k in keys if k in summary}))
    if summary.get("diverged"):
        raise RunDiverged(f"the run {summary['stop_reason']}; the summary is in {summary['run_dir']}")


@click.command()
@training_options
@_runtime_options
@_decentralized_options
@remote_run_options
@secure_options
@click.option("--n-proc", default=None, type=int,
              help="Worker processes: local ones (default 2; 0 with --remote), or with --launcher slurm the tasks of the srun step "
                   "(default: every CPU of the allocation but the broker's).")
@click.option("--launcher", type=click.Choice(list(LAUNCHERS)), default=None,
              help="Who starts the workers: 'local' processes, 'ssh' (the hosts of --remote) or 'slurm' (one srun step across the "
                   "allocation). Default: ssh with --remote; slurm inside a Slurm job when --n-proc is not given; else local.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue RUN_DIR from its last checkpoint; 'auto': continue --out if it holds a checkpoint, else start it fresh "
                   "(for batch jobs that are submitted again).")
@click.pass_context
def run(ctx: click.Context, n_proc: int | None, launcher: str | None, resume_dir: str | None, out: str | None, quiet: bool, **params) -> None:
    """Train with a broker and N worker processes over ZeroMQ."""
    from zsgd.runtime.threads import single_threaded_blas

    single_threaded_blas()  # before numpy: local workers are forked from this process and keep its BLAS
    from zsgd.runtime.runner import run_distributed

    launcher = _choose_launcher(launcher, n_proc, params.get("hosts_file"), quiet)
    opts = run_options(params, launcher=launcher, show=not quiet)
    if launcher == "slurm":
        opts.slurm_request, n_proc = n_proc, 0
    defaulted: set[str] = set()
    if resume_dir not in (None, "auto"):
        from zsgd.output.rundir import check_path_name

        check_path_name("--resume", resume_dir)
    if resume_dir == "auto":
        resume_dir = _auto_resume(out, quiet)
    if resume_dir is not None:
        cfg, stored = _resume_config(ctx, resume_dir, params | {k: getattr(opts.server, k) for k in RESUME_RUN_FLAGS})
        for key in RESUME_RUN_FLAGS:
            setattr(opts.server, key, stored[key])
        if n_proc is None:  # the run's own worker count, unless changed on purpose (then config.yaml records it)
            n_proc = stored["n_proc"]
        if ctx.get_parameter_source("servers") == click.core.ParameterSource.DEFAULT:
            opts.server.servers = stored["servers"]  # the checkpoint holds the whole vector: any K can continue it
        defaulted = set(stored["auto_scale"])  # what was scaled when the run started (not scaled again)
    if n_proc is None:
        n_proc = 0 if opts.remote.hosts_file else 2
    opts.n_proc = n_proc
    if resume_dir is None:
        if out is not None:
            from zsgd.output.rundir import check_out_dir

            check_out_dir(out)  # before remote hosts are probed or data loaded
        cfg = build_config(ctx, params, default_name=f"run-{params['model']}-{opts.server.algo.replace(':', '')}-x{n_proc}", defaulted=defaulted)
    opts.auto_scale = _auto_scaled(defaulted)
    summary = run_distributed(cfg, opts, out=out, resume_dir=resume_dir)
    _print_run_summary(summary)


def run_options(params: dict[str, Any], **resolved: Any) -> "RunOptions":
    """The nested ``RunOptions`` of 'zsgd run' and 'zsgd broker', from click's params.

    Every param named as a run option (``RunOptions.flag_names``) is taken out
    of ``params``, which keeps the training flags for ``build_config``;
    ``resolved`` sets what the command worked out itself (launcher, --quiet).
    Flags that need others (--allow-partial without --remote) fail here,
    before anything is read or probed."""
    from zsgd.runtime.run_options import RunOptions

    ssh = pop_ssh_flags(params)
    if params.get("shared_memory", False) is None:
        del params["shared_memory"]  # not given: the option's own default (ZSGD_SHARED_MEMORY)
    names = RunOptions.flag_names()
    values = {k: params.pop(k) for k in [k for k in params if k in names]} | ({"ssh": ssh} if ssh is not None else {})
    opts = RunOptions.from_flags(values | resolved)
    opts.remote.validate(opts.launcher)
    return opts


def _auto_scaled(defaulted: set[str]) -> list[str]:
    from zsgd.algorithms.scaling import SCALED_FIELDS

    return sorted(defaulted & set(SCALED_FIELDS))


def _choose_launcher(launcher: str | None, n_proc: int | None, remote: str | None, quiet: bool) -> str:
    """The launcher given, or the one the situation calls for; contradictory flags are one line, exit 2."""
    import os

    if launcher is None:
        if remote:
            return "ssh"
        if os.environ.get("SLURM_JOB_ID") and n_proc is None:
            if not quiet:
                click.echo(f"note: inside Slurm job {os.environ['SLURM_JOB_ID']}: workers start as an srun step "
                           "(--launcher slurm); pass --launcher local or --n-proc N to start them here", err=True)
            return "slurm"
        return "local"
    if launcher == "ssh" and not remote:
        raise ZsgdError("--launcher ssh needs --remote HOSTS_FILE (the hosts to start workers on)")
    if launcher != "ssh" and remote:
        raise ZsgdError(f"--remote starts workers over SSH; it does not go with --launcher {launcher}")
    return launcher


def _auto_resume(out: str | None, quiet: bool) -> str | None:
    """``--resume auto``: RUN_DIR (= --out) if it holds a checkpoint, else None (a fresh run there).

    A directory with metrics but no checkpoint (a job killed before its first
    one) starts over: its old metrics file is kept aside, not appended to."""
    import time
    from pathlib import Path

    if out is None:
        raise ZsgdError("--resume auto needs --out RUN_DIR (the directory a resubmitted job continues)")
    path = Path(out)
    if (path / "checkpoint.json").is_file() and (path / "config.yaml").is_file():
        click.echo(f"--resume auto: continuing {path} from its checkpoint", err=True)  # even with --quiet: batch logs must show it
        return str(path)
    if (path / "metrics.jsonl").exists():
        (path / "metrics.jsonl").rename(path / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    return None


RESUME_RUN_FLAGS = ("algo", "staleness_lr", "compress", "compress_replies")  # stored with the run; a resume keeps them
STOP_FIELDS = ("epochs", "steps", "time_limit", "target_acc", "target_ppl")  # what a resume may extend


def _resume_config(ctx: click.Context, resume_dir: str, params: dict):
    """The stored configuration of RUN_DIR, checked, and its run options.

    Explicit stop flags (--steps ...) extend it; any other flag that differs
    from the stored run is refused, since resuming would silently ignore it.
    """
    from pathlib import Path

    from zsgd.commands.options import TRAINING_FLAGS
    from zsgd.core.config import TrainConfig
    from zsgd.core.yaml_loader import load_marked
    from zsgd.runtime.server.checkpoint import load_counters

    path = Path(resume_dir) / "config.yaml"
    if not path.is_file():
        raise ZsgdError(f"{resume_dir} is not a zsgd run directory (no config.yaml)")
    if params.get("config_file"):
        raise ZsgdError("--config does not apply with --resume: the run keeps the configuration in its config.yaml")
    doc = load_marked(path, what="run configuration")
    stored = doc.data if isinstance(doc.data, dict) else None
    if stored is None:
        raise ZsgdError(f"{path}: not a run configuration (a mapping expected)")
    run_opts = stored.get("run") if stored.get("mode") == "run" else None
    if not isinstance(run_opts, dict):
        raise ZsgdError(f"{resume_dir} was not made by 'zsgd run'; only distributed runs can be resumed")
    from zsgd.runtime.run_options import flat_run_dict

    run_opts = flat_run_dict(run_opts)  # nested, or flat as earlier versions wrote it
    fields = {f for _flag, f, _k in TRAINING_FLAGS} | {"extra"}
    values = {k: v for k, v in stored.items() if k in fields}
    given = {f for f in fields | set(RESUME_RUN_FLAGS)
             if f in params and ctx.get_parameter_source(f) in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}
    for field in sorted(given - set(STOP_FIELDS)):
        old = run_opts.get(field, "none" if field.startswith("compress") else None) if field in RESUME_RUN_FLAGS else values.get(field)
        if params[field] != old:
            flag = field.replace("_", "-")
            raise ZsgdError(f"--resume continues the run as it was configured: --{flag} {params[field]} differs from its "
                            f"{old} (in {path}); start a new run to change it")
    for field in STOP_FIELDS:
        if field in given:
            values[field] = params[field]
    try:
        cfg = TrainConfig.from_dict(values).validate()
    except (ZsgdError, TypeError) as exc:
        raise ZsgdError(f"{path}: {exc}") from None
    resolved = {"algo": run_opts.get("algo", "async"), "staleness_lr": run_opts.get("staleness_lr", "off"),
                "compress": run_opts.get("compress", "none"), "compress_replies": run_opts.get("compress_replies", "none"),
                "n_proc": run_opts.get("n_proc", 2), "auto_scale": run_opts.get("auto_scale") or [],
                "servers": run_opts.get("servers", 1)}
    for key in ("algo", "staleness_lr", "compress", "compress_replies"):
        if not isinstance(resolved[key], (str, bool)):
            raise ZsgdError(f"{path}: run.{key} must be a string, got {str(resolved[key])[:40]}")
    if isinstance(resolved["n_proc"], bool) or not isinstance(resolved["n_proc"], int) or resolved["n_proc"] < 0:
        raise ZsgdError(f"{path}: run.n_proc must be a whole number >= 0, got {str(resolved['n_proc'])[:40]}")
    if isinstance(resolved["servers"], bool) or not isinstance(resolved["servers"], int) or resolved["servers"] < 1:
        raise ZsgdError(f"{path}: run.servers must be a whole number >= 1, got {str(resolved['servers'])[:40]}")
    if not isinstance(resolved["auto_scale"], list) or not all(isinstance(f, str) for f in resolved["auto_scale"]):
        raise ZsgdError(f"{path}: run.auto_scale must be a list of option names")
    counters = load_counters(Path(resume_dir))
    done = counters["updates"]
    if cfg.steps is not None and cfg.steps <= done:
        if "steps" in given:
            raise ZsgdError(f"--steps {cfg.steps}: {resume_dir} is already at {done} updates; give --steps above {done} to continue it")
        raise ZsgdError(f"{resume_dir} already reached its --steps {cfg.steps} ({done} updates); give --steps above {done} to continue it")
    if cfg.time_limit is not None and cfg.time_limit <= counters.get("elapsed", 0.0):
        raise ZsgdError(f"--time {cfg.time_limit:g}: {resume_dir} has already run {counters.get('elapsed', 0.0):.0f} s; "
                        f"give a longer --time to continue it")
    return cfg, resolved


@click.command()
@training_options
@_runtime_options
@_decentralized_options
@click.option("--workers", "expect_workers", required=True, type=int, help="Number of workers the run expects (they join with 'zsgd worker').")
@click.option("--evaluator/--no-evaluator", default=True, show_default=True, help="Start a local evaluator process.")
@secure_options
@click.pass_context
def broker(ctx: click.Context, out: str | None, quiet: bool, **params) -> None:
    """Run the broker alone; start workers by hand with 'zsgd worker --connect'."""
    from zsgd.runtime.threads import single_threaded_blas

    single_threaded_blas()  # before numpy: local range servers are forked from this process and keep its BLAS
    from zsgd.runtime.runner import run_distributed

    if params["expect_workers"] < 1:
        raise ZsgdError(f"--workers must be >= 1, got {params['expect_workers']}")
    defaulted: set[str] = set()
    cfg = build_config(ctx, params, default_name=f"broker-{params['model']}-{params['algo'].replace(':', '')}", defaulted=defaulted)
    opts = run_options(params, n_proc=0, show=not quiet)
    opts.auto_scale = _auto_scaled(defaulted)
    summary = run_distributed(cfg, opts, out=out)
    _print_run_summary(summary)
