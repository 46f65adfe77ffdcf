"""Preparing hosts for remote workers: ``zsgd remote init`` and ``zsgd remote check``.

Why a wheel of *this* build: a worker must run exactly the code the broker
runs (the wire protocol and the training step are shared), including local
changes not yet released. So ``init`` builds a wheel here (``pip wheel
--no-deps``), copies it over the same ssh the run uses, and installs it with
its dependencies into a virtual environment on each host (``~/.zsgd/venv``),
then compiles the numba kernels once there so the first run starts fast.

Idempotent: the wheel's sha256 is recorded on the host (``installed.json``);
when it matches, ``init`` is one ssh round trip per host. Hosts sharing a
home directory (NFS) share the venv: a lock file serialises installers, and
the second finds the work done.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from zsgd import __version__
from zsgd.errors import ZsgdError
from zsgd.remote.hosts import Host
from zsgd.remote.ssh import SshOptions, explain_failure, parallel, parse_tagged, probe_host, python_code_sh, python_sh

INIT_TAG = "ZSGD-INIT "
REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01: zip's earliest date; fixed so equal sources give an equal wheel hash
SOURCE_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "README.md", "LICENSE", "MANIFEST.in")


@dataclass
class Wheel:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def source_tree() -> Path | None:
    """The checkout this zsgd runs from (an editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]  # zsgd/remote/provision.py -> the checkout
    return root if (root / "pyproject.toml").is_file() and (root / "zsgd" / "__init__.py").is_file() else None


def build_wheel(out_dir: Path, wheel: str | None = None) -> Wheel:
    """A wheel of this zsgd: ``wheel`` if given, else built from the source tree.

    The sources are copied to a scratch folder first, so stale files in a
    ``build/`` folder can never slip into the wheel and the checkout stays clean."""
    if wheel is not None:
        p = Path(wheel)
        if not p.is_file() or not p.name.endswith(".whl"):
            raise ZsgdError(f"--wheel {wheel}: not a wheel file")
        return Wheel(p, _sha256(p))
    root = source_tree()
    if root is None:
        raise ZsgdError("zsgd is not installed from a source checkout here; pass --wheel FILE (e.g. from 'pip download zsgd')")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zsgd-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCE_FILES:
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        shutil.copytree(root / "zsgd", src / "zsgd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
        args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(out_dir), str(src)]
        try:
            import setuptools  # noqa: F401 -- present: build offline, without an isolated build environment

            args.insert(5, "--no-build-isolation")
        except ImportError:
            pass
        env = os.environ | {"SOURCE_DATE_EPOCH": REPRODUCIBLE_EPOCH}
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    wheels = sorted(out_dir.glob("zsgd-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ZsgdError(f"building the zsgd wheel failed: {tail[-1] if tail else 'no output'}")
    return Wheel(wheels[-1], _sha256(wheels[-1]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Runs on the host with the base interpreter, under a lock in the zsgd folder.
INSTALL_CODE = r'''
import fcntl, json, os, subprocess, sys, time
d, whl, sha, system_site, warm = os.path.expanduser(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5] == "1"
venv_dir = os.path.join(d, "venv")
vpy = os.path.join(venv_dir, "bin", "python")
marker = os.path.join(d, "installed.json")
def say(obj):
    print("ZSGD-INIT " + json.dumps(obj), flush=True)
def run(args, what, timeout=1800):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)
    if p.returncode != 0:
        lines = [l for l in p.stdout.strip().splitlines() if l.strip()]
        say({"status": "failed", "error": "%s failed: %s" % (what, lines[-1] if lines else "exit %d" % p.returncode)})
        sys.exit(1)
    return p.stdout
os.makedirs(d, exist_ok=True)
with open(os.path.join(d, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with open(marker) as f:
            cur = json.load(f)
    except Exception:
        cur = {}
    same_base = cur.get("base") == os.path.realpath(sys.executable) and cur.get("system_site_packages") == system_site
    if cur.get("sha256") == sha and same_base and os.access(vpy, os.X_OK):
        say({"status": "up to date", "zsgd": cur.get("zsgd"), "python": cur.get("python")})
        sys.exit(0)
    import venv
    try:
        venv.EnvBuilder(system_site_packages=system_site, clear=not same_base and os.path.isdir(venv_dir), symlinks=True,
                        with_pip=False).create(venv_dir)
    except Exception as exc:
        say({"status": "failed", "error": "creating %s failed: %s" % (venv_dir, exc)})
        sys.exit(1)
    if subprocess.run([vpy, "-m", "pip", "--version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        p = subprocess.run([vpy, "-m", "ensurepip", "--upgrade", "--default-pip"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            say({"status": "failed", "error": "this Python has no venv/ensurepip support (Debian/Ubuntu: apt install python3-venv)"})
            sys.exit(1)
    pip = [vpy, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(pip + [whl], "pip install (zsgd's dependencies)")
    run(pip + ["--no-deps", "--force-reinstall", whl], "pip install zsgd")
    version = run([vpy, "-c", "import zsgd; print(zsgd.__version__)"], "importing zsgd").strip().splitlines()[-1]
    if warm:
        import base64
        run([vpy, "-c", base64.b64decode(sys.argv[6]).decode()], "compiling the numba kernels")
    info = {"sha256": sha, "zsgd": version, "python": "%d.%d.%d" % tuple(sys.version_info[:3]), "base": os.path.realpath(sys.executable),
            "system_site_packages": system_site, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(marker + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(marker + ".tmp", marker)
    say({"status": "installed", "zsgd": version, "python": info["python"]})
'''

# Compiles (and caches) the kernels every built-in model uses, for training and evaluation.
WARM_CODE = (
    "import numpy as np\n"
    "import zsgd.nn.models as m\n"
    "from zsgd.data import to_float\n"
    "w_up = getattr(m, 'warm_up_in_parallel', None) or getattr(m, 'warm_up', None)\n"
    "if w_up is not None:\n    w_up()\n"
    "else:\n"
    "    x = np.zeros((4, 1, 28, 28), np.uint8); y = np.arange(4) % 10\n"
    "    for name in ('logreg', 'mlp', 'cnn', 'lenet5'):\n"
    "        model = m.get_model(name, input_shape=(1, 28, 28), n_classes=10, seed=0); w = model.init(seed=0)\n"
    "        model.loss_and_grad(w, to_float(x), y, training=True, seed=1); m.evaluate(model, w, x, y)\n"
)


@dataclass
class InitResult:
    host: Host
    status: str  # "installed" | "up to date" | "failed"
    python: str | None = None
    zsgd: str | None = None
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def init_host(ssh: SshOptions, host: Host, wheel: Wheel, system_site_packages: bool = False, warm: bool = True) -> InitResult:
    """Prepare one host; never raises for the host's own problems (they go into the result)."""
    t0 = time.monotonic()

    def done(status: str, **kw) -> InitResult:
        return InitResult(host, status, seconds=time.monotonic() - t0, **kw)

    base = probe_host(ssh, host, prefer_venv=False)
    if not base.ok:
        return done("failed", python=base.python, error=base.reason)
    marker = base.installed or {}
    if (marker.get("sha256") == wheel.sha256 and marker.get("base") == base.realpath
            and marker.get("system_site_packages") == system_site_packages):
        venv = probe_host(ssh, host)  # the marker says so; make sure the venv still imports zsgd
        if venv.ok and venv.venv and venv.zsgd:
            return done("up to date", python=venv.python, zsgd=venv.zsgd)
    remote_whl = f"wheels/{wheel.sha256[:16]}/{wheel.name}"
    upload = (f"{python_sh(host, ssh.remote_dir, prefer_venv=False)}; umask 077; mkdir -p \"$D/wheels/{wheel.sha256[:16]}\" && "
              f"cat > \"$D/{remote_whl}.$$.part\" && mv -f \"$D/{remote_whl}.$$.part\" \"$D/{remote_whl}\"")
    proc = ssh.run(host, upload, input=wheel.path.read_bytes(), timeout=ssh.connect_timeout + 600)
    if proc.returncode != 0:
        return done("failed", python=base.python, error="copying the wheel failed: " + explain_failure(host, ssh, proc))
    install = (f"{python_sh(host, ssh.remote_dir, prefer_venv=False)}; exec \"$PY\" {python_code_sh(INSTALL_CODE)} \"$D\" "
               f"\"$D/{remote_whl}\" {wheel.sha256} {int(system_site_packages)} {int(warm)} {base64.b64encode(WARM_CODE.encode()).decode()}")
    proc = ssh.run(host, install, timeout=ssh.connect_timeout + 1800)
    data = parse_tagged(proc.stdout, INIT_TAG)
    if data is None:
        return done("failed", python=base.python, error=explain_failure(host, ssh, proc))
    if data.get("status") == "failed":
        return done("failed", python=base.python, error=str(data.get("error")))
    return done(str(data.get("status")), python=data.get("python") or base.python, zsgd=data.get("zsgd"))


def init_hosts(ssh: SshOptions, hosts: list[Host], wheel: Wheel, system_site_packages: bool = False, warm: bool = True) -> list[InitResult]:
    return parallel(lambda h: init_host(ssh, h, wheel, system_site_packages, warm), hosts)


@dataclass
class CheckResult:
    host: Host
    ready: bool
    python: str | None
    zsgd: str | None
    detail: str
    seconds: float


def check_hosts(ssh: SshOptions, hosts: list[Host], hosts_path: str) -> list[CheckResult]:
    """``zsgd remote check``: is each host ready to run workers?"""
    def one(h: Host) -> CheckResult:
        p = probe_host(ssh, h)
        if not p.ok:
            return CheckResult(h, False, p.python, None, p.reason, p.seconds)
        if not p.zsgd:
            return CheckResult(h, False, p.python, None, f"zsgd not installed for {p.executable}; run 'zsgd remote init {hosts_path}'", p.seconds)
        where = "venv" if p.venv and p.installed else ("python= from the hosts file" if h.python else "python3 on PATH")
        if p.zsgd != __version__:
            return CheckResult(h, False, p.python, p.zsgd, f"zsgd {p.zsgd} there, {__version__} here; run 'zsgd remote init {hosts_path}'", p.seconds)
        return CheckResult(h, True, p.python, p.zsgd, f"ready ({where})", p.seconds)

    return parallel(one, hosts)
