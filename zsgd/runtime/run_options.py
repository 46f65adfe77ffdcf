"""The options of ``zsgd run`` and ``zsgd broker``, in groups by concern.

``RunOptions`` is the run itself -- how many workers, who starts them -- and
holds one small group per concern::

    server         what the broker computes: --algo, --staleness-lr, --compress ... (the broker takes it as it is)
    network        where it listens and how liveness is judged: --host, --port, --heartbeat, --timeout
    emulation      injected network conditions and stragglers (builds the LinkEmulator)
    remote         who may reach the broker, from where: --remote HOSTS, --advertise, ssh, CURVE
    decentralized  dsgd/dsgt/cadmm: the graph and the rule's hyper-parameters
    output         live view, TensorBoard

A group's field is named as its flag (``--compress-replies`` is
``server.compress_replies``), so ``RunOptions.from_flags`` places every flag
without a table, and adding a flag is one field plus one click option. Each
group checks its own values; ``RunOptions.validate`` adds the checks that
span groups. A run's ``config.yaml`` stores ``to_dict()`` under ``run:``
(``flat_run_dict`` also reads the flat form of earlier versions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from zsgd.errors import ZsgdError
from zsgd.wire.shm import enabled_by_default as shm_by_default


@dataclass
class ServerOptions:
    """What the broker's service computes, and when it checkpoints and evaluates."""

    algo: str = "async"
    staleness_lr: str | bool = "off"
    compress: str = "none"  # the workers' update codec (travels in ASSIGN)
    compress_replies: str = "none"  # broker->worker weight deltas through this codec (zsgd.compression.delta)
    checkpoint_every: int = 500  # updates; 0: off
    eval_interval: float = 0.0  # also evaluate every N seconds (0: off)
    servers: int = 1  # --servers K: the vector split over K server processes (zsgd.runtime.server.sharded)
    start_wait: float = 10.0  # seconds the first ready worker waits for the others before training starts (0: no barrier)

    @property
    def decentralized(self) -> bool:
        from zsgd.decentralized.rules import is_decentralized

        return is_decentralized(self.algo)

    def validate(self) -> "ServerOptions":
        """Parses --staleness-lr in place. Decentralized algorithms are checked by ``DecentralizedRunOptions``
        first: ``parse_algo`` names the server algorithms, which zsgd sim's centralized grid also accepts."""
        from zsgd.algorithms import parse_algo, parse_staleness_lr
        from zsgd.compression import make_codec

        if not self.decentralized:
            parse_algo(self.algo)
        self.staleness_lr = parse_staleness_lr(self.staleness_lr)
        if self.staleness_lr == "per-coordinate" and not self.algo.startswith(("async", "ssp")):
            raise ZsgdError(f"--staleness-lr per-coordinate needs --algo async or ssp:S, not {self.algo!r}")
        make_codec(self.compress, 1)
        make_codec(self.compress_replies, 1)
        from zsgd.core.config import DAY, check_seconds

        check_seconds("--eval-interval", self.eval_interval, DAY)
        check_seconds("--start-wait", self.start_wait, DAY)
        if self.checkpoint_every < 0:
            raise ZsgdError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        from zsgd.core.ranges import check_servers

        check_servers(self.servers)
        if not self.decentralized:
            from zsgd.algorithms import check_servers_support

            check_servers_support(self.algo, self.servers)
        if self.servers > 1 and self.decentralized:
            raise ZsgdError(f"--servers splits the central model over server processes; {self.algo} has no central model")
        return self


@dataclass
class NetworkOptions:
    """Where the broker listens and how fast a silent peer is declared dead."""

    host: str | None = None  # None: loopback, or with --remote the advertised address
    port: int = 0
    heartbeat: float = 1.0
    timeout: float = 3.0  # a peer silent this long is dead (3 heartbeats)
    shared_memory: bool = field(default_factory=shm_by_default)  # workers on the broker's machine exchange through /dev/shm

    def validate(self) -> "NetworkOptions":
        from zsgd.runtime.worker.node_options import check_liveness

        if not 0 <= self.port <= 65535:
            raise ZsgdError(f"--port must be in 0..65535, got {self.port}")
        check_liveness(self.heartbeat, self.timeout)
        return self


@dataclass
class EmulationOptions:
    """Network conditions and stragglers injected into a real run (same specs as zsgd sim)."""

    inject_latency: str | None = None
    inject_bandwidth: str | None = None
    inject_loss: str | None = None
    stragglers: str | None = None
    inject_compute: str | None = None  # each step stretched to a seeded draw (zsgd.network.compute_draw), as zsgd sim --compute
    inject_broker_bandwidth: str | None = None  # the server's own NIC, shared by every worker's messages (zsgd sim --broker-bandwidth)

    def validate(self, n_workers: int = 0) -> "EmulationOptions":
        self.emulator(n_workers, 0)  # parses every spec now, so a typo fails before anything starts
        return self

    def emulator(self, n_workers: int, seed: int):
        """A LinkEmulator when any network condition or straggler is injected, else None."""
        from zsgd.runtime.emulation import emulator_from_specs

        return emulator_from_specs(self.inject_latency, self.inject_bandwidth, self.inject_loss, self.stragglers, n_workers, seed,
                                   compute=self.inject_compute, broker_bandwidth=self.inject_broker_bandwidth)


@dataclass
class RemoteOptions:
    """Who may reach the broker and from where: remote hosts over SSH, the advertised address, CURVE."""

    hosts_file: str | None = None  # --remote: its workers take the ids after the local ones (zsgd.remote.launcher)
    advertise: str | None = None
    allow_partial: bool = False
    ssh: dict | None = None  # zsgd.remote.ssh.SshOptions fields
    secure: bool = False  # CURVE even on loopback (always on beyond it)
    keys_dir: str | None = None  # from 'zsgd keys generate'

    def validate(self, launcher: str = "local") -> "RemoteOptions":
        from zsgd.output.rundir import check_path_name

        for flag, path in (("--remote", self.hosts_file), ("--keys", self.keys_dir)):
            if path is not None:
                check_path_name(flag, path)
        if self.hosts_file is None and self.allow_partial:
            raise ZsgdError("--allow-partial needs --remote HOSTS_FILE")
        if self.hosts_file is None and self.advertise and launcher != "slurm":
            raise ZsgdError("--advertise is the address of workers on other machines: they need --remote HOSTS_FILE or --launcher slurm")
        return self


@dataclass
class DecentralizedRunOptions:
    """dsgd, dsgt, cadmm: the graph and the rule's hyper-parameters (None: the defaults of DecentralizedParams;
    refused with a centralized --algo)."""

    topology: str | None = None
    alpha0: float | None = None
    mu: float | None = None
    rho: float | None = None
    rho_scaling: float | None = None
    primal_steps: int | None = None
    gamma: float | None = None

    def params(self):
        """The rule's ``DecentralizedParams`` from the flags that were given (validated)."""
        from zsgd.decentralized.rules import DecentralizedParams

        given = {k: getattr(self, k) for k in DECENTRALIZED_FLAGS[1:] if getattr(self, k) is not None}
        return DecentralizedParams(**given).validate()

    def validate(self, server: ServerOptions) -> "DecentralizedRunOptions":
        """These flags against the algorithm: each applies to some decentralized rules, and those rules refuse
        the broker's own options."""
        from zsgd.decentralized.rules import DECENTRALIZED, PARAMS_OF

        algo = server.algo
        if not server.decentralized:
            given = [k for k in DECENTRALIZED_FLAGS if getattr(self, k) is not None]
            if given:
                raise ZsgdError(f"--{given[0].replace('_', '-')} applies to decentralized algorithms (dsgd, dsgt, cadmm), not {algo}")
            return self
        if algo not in DECENTRALIZED:
            raise ZsgdError(f"bad algorithm {algo!r}: {algo.partition(':')[0]} takes its options as flags (--topology, --alpha0, --rho ...)")
        for k in DECENTRALIZED_FLAGS[1:]:
            if getattr(self, k) is not None and k not in PARAMS_OF[algo]:
                raise ZsgdError(f"--{k.replace('_', '-')} is a parameter of {', '.join(a for a, p in PARAMS_OF.items() if k in p)}, not {algo}")
        self.params()
        if server.staleness_lr not in ("off", False, None):
            raise ZsgdError(f"--staleness-lr applies to centralized algorithms, not {algo}")
        if server.compress_replies != "none":
            raise ZsgdError(f"--compress-replies applies to the broker's replies; {algo} has none (--compress codes its peer messages)")
        return self


DECENTRALIZED_FLAGS = tuple(f.name for f in fields(DecentralizedRunOptions))


@dataclass
class OutputOptions:
    show: bool = True  # the live view and progress lines (--quiet: off); not stored in config.yaml
    tensorboard: bool = False  # also write TensorBoard event files (tensorboardX)
    plots: bool = True  # the run's PNGs at its end (--no-plots: none; 'zsgd plot RUN_DIR' draws them later)


GROUPS: dict[str, type] = {"server": ServerOptions, "network": NetworkOptions, "emulation": EmulationOptions, "remote": RemoteOptions,
                           "decentralized": DecentralizedRunOptions, "output": OutputOptions}


@dataclass
class RunOptions:
    """A run's workers and who starts them; the other options in their groups (see the module docstring)."""

    n_proc: int = 2  # local worker processes; with --launcher slurm 0 (the srun step's tasks are slurm_request)
    launcher: str = "local"  # "local", "ssh" (with --remote) or "slurm" (workers as one srun step: zsgd.runtime.launch.slurm)
    slurm_request: int | None = None  # workers asked for under Slurm (None: every CPU of the allocation but the broker's)
    expect_workers: int | None = None  # broker-only mode: workers started by hand
    evaluator: bool = True
    auto_scale: list[str] = field(default_factory=list)  # defaulted hyper-parameters to scale to the workers (zsgd.algorithms.scaling)
    remote_workers: int = 0  # set once the hosts have answered (zsgd.runtime.launch.access)
    slurm_workers: int = 0  # set once the allocation is read
    server: ServerOptions = field(default_factory=ServerOptions)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    emulation: EmulationOptions = field(default_factory=EmulationOptions)
    remote: RemoteOptions = field(default_factory=RemoteOptions)
    decentralized: DecentralizedRunOptions = field(default_factory=DecentralizedRunOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    @classmethod
    def flag_names(cls) -> set[str]:
        """Every option's name: the run's own fields and each group's (they are distinct)."""
        own = {f.name for f in fields(cls) if f.name not in GROUPS}
        return own.union(*({f.name for f in fields(kind)} for kind in GROUPS.values()))

    @classmethod
    def from_flags(cls, values: dict[str, Any]) -> "RunOptions":
        """The nested options from flat ``{name: value}`` (click's parameter names); each value goes to the
        group with a field of its name. Unset options keep their defaults; an unknown name is a TypeError."""
        unknown = sorted(set(values) - cls.flag_names())
        if unknown:
            raise TypeError(f"not run options: {', '.join(unknown)}")
        groups = {name: kind(**{f.name: values[f.name] for f in fields(kind) if f.name in values}) for name, kind in GROUPS.items()}
        return cls(**{k: v for k, v in values.items() if k in {f.name for f in fields(cls)}}, **groups)

    def to_dict(self) -> dict[str, Any]:
        """What config.yaml stores under ``run:`` (nested; the live-view switch left out)."""
        out = asdict(self)
        del out["output"]["show"]
        return out

    @property
    def n_workers(self) -> int:
        return self.expect_workers or self.n_proc + self.remote_workers + self.slurm_workers

    def emulator(self, seed: int):
        return self.emulation.emulator(self.n_workers, seed)

    def validate(self) -> "RunOptions":
        self.decentralized.validate(self.server)
        self.server.validate()
        self.emulation.validate(self.n_workers)
        if self.emulation.inject_compute and self.server.decentralized:
            raise ZsgdError(f"--inject-compute stretches the steps a parameter server hands out; {self.server.algo} has none "
                            f"(use --stragglers to slow decentralized nodes)")
        self.remote.validate(self.launcher)
        if self.n_proc < 0 or (self.n_proc == 0 and not self.expect_workers and not self.remote.hosts_file and self.launcher != "slurm"):
            raise ZsgdError(f"--n-proc must be >= 1, got {self.n_proc}")
        from zsgd.runtime.launch.local import max_local_workers

        cap, why = max_local_workers()
        if self.n_proc > cap:
            raise ZsgdError(f"--n-proc {self.n_proc:,} is more local workers than this machine can run (at most {cap} for {why}); "
                            f"use 'zsgd sim --workers {self.n_proc}' to study that many, or --remote to add machines")
        self._check_local_servers()
        self.network.validate()
        return self


    def _check_local_servers(self) -> None:
        """--servers K forks every range server the hosts file does not place elsewhere (K-1 besides the
        coordinator): at most what this machine can run (``max_local_servers``), checked before anything starts."""
        from zsgd.runtime.launch.local import max_local_servers

        placed = 0
        if self.remote.hosts_file is not None and self.server.servers > 1:
            from zsgd.remote.hosts import load_hosts

            placed = sum(h.servers for h in load_hosts(self.remote.hosts_file))
        local = self.server.servers - 1 - placed
        cap, why = max_local_servers()
        if local > cap:
            raise ZsgdError(f"--servers {self.server.servers:,} would start {local:,} range servers on this machine, more than it can "
                            f"run (at most {cap} for {why}); place them on other hosts (servers=N in a --remote hosts file), "
                            f"or use 'zsgd sim --servers {self.server.servers}' to study that many")


def flat_run_dict(stored: dict[str, Any]) -> dict[str, Any]:
    """A config.yaml's ``run:`` mapping as flat ``{option: value}``: the nested form, or the flat one
    earlier versions wrote (the group names are no option's name, so the two cannot be confused)."""
    flat = {k: v for k, v in stored.items() if k not in GROUPS or not isinstance(v, dict)}
    for name in GROUPS:
        if isinstance(stored.get(name), dict):
            flat |= stored[name]
    return flat
