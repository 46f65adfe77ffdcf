#!/usr/bin/env bash
# The whole suite on every core: the README's test command and what CI runs.
#
# Why two passes: most tests wait on processes, sockets and daemons and leave a
# core idle (a serial run keeps about 0.9 of 2 cores busy), so pytest-xdist runs
# them on all cores. The files marked ``serial`` (tests/serial_files.py) hold a real
# run's wall time against the simulator's model of it; a test beside them would
# take the cores their twin did not account for, so they run after, alone.
# Tests on a shared daemon (sshd, the one-node Slurm cluster) stay on one worker.
#
# Arguments go to both passes (-x, -k, --lf ...). Without any, a pass that
# collects nothing fails, as a plain `pytest` does; with some, it may be empty.
# ZSGD_TEST_JOBS sets the workers of the first pass (default: the cores; 1 runs
# it without pytest-xdist).
set -uo pipefail
cd "$(dirname "$0")/.."

jobs="${ZSGD_TEST_JOBS:-$(nproc)}"
if ! [[ "$jobs" =~ ^[1-9][0-9]*$ ]]; then
    echo "scripts/test.sh: ZSGD_TEST_JOBS must be a positive whole number, not '$jobs'" >&2
    exit 2
fi
if [ "$jobs" -gt 1 ]; then
    parallel=(-n "$jobs" --dist loadgroup)
else
    parallel=(-p no:xdist)
fi

passed() {  # a pass's exit status: 0 ok; 5 (nothing collected) is ok only when arguments narrowed the run
    local status=$1
    if [ "$status" -eq 5 ] && [ "$#" -gt 1 ]; then status=0; fi
    echo "$status"
}

echo "== pass 1 of 2: every test not marked serial, ${jobs} at a time =="
python3 -m pytest "${parallel[@]}" -m "not serial" "$@"
first=$(passed $? "$@")
echo "== pass 2 of 2: the serial tests (real wall time against the simulator), alone =="
if [ "$#" -eq 0 ]; then  # collect only their files (tests/serial_files.py): 5 s less than collecting all to deselect
    mapfile -t serial < <(python3 -c "import sys; sys.path.insert(0, 'tests'); import serial_files
print('\n'.join(f'tests/{name}' for name in sorted(serial_files.SERIAL_FILES)))")
else
    serial=()
fi
python3 -m pytest -p no:xdist -m serial "${serial[@]}" "$@"
second=$(passed $? "$@")

if [ "$first" -ne 0 ]; then exit "$first"; fi
exit "$second"
