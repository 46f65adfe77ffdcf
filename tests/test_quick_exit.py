"""A zsgd command that succeeded ends without the interpreter's teardown, its exit handlers run."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import atexit, sys, threading
atexit.register(lambda: print("exit handler ran", flush=True))
sys.stdout.write("unflushed ")
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: None).start()  # may be alive when quick_exit looks: then a normal exit
    threading.Thread(target=__import__("time").sleep, args=(0.3,)).start()
from zsgd.commands.group import quick_exit
quick_exit()
print("returned")
"""


def run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)


def test_quick_exit_runs_the_exit_handlers_and_flushes_the_streams():
    done = run("plain")
    assert done.returncode == 0
    assert done.stdout == "unflushed exit handler ran\n"


def test_with_another_thread_alive_the_process_ends_as_usual():
    done = run("thread")
    assert done.returncode == 0
    assert done.stdout == "unflushed returned\nexit handler ran\n"
