#!/usr/bin/env python3
"""Prepare the hosts of a hosts file for remote workers: same as ``zsgd remote init``.

    python scripts/init_remote.py ssh_hosts.txt [--system-site-packages] [--ssh-config FILE] ...

Builds a wheel of this checkout, copies it to every host over ssh, installs
it into a venv there (~/.zsgd/venv) and compiles the kernels, in parallel.
Idempotent: running it again while the code is unchanged is a quick no-op.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zsgd.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["remote", "init", *sys.argv[1:]])
