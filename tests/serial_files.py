"""The test files that run alone, in the second pass of scripts/test.sh (conftest marks their tests ``serial``).

They hold a real run's wall time against a model of it (the simulator's twin and its tolerance), so a test beside
them would take the cores their twin did not account for. test_sim_validate.py is not one: its runs check the
table, the files and that the exit status is the table's verdict, whichever it is; the one verdict it asserts is a
server 100x slower than the real one's. Kept apart from conftest so that scripts/test.sh can name the files to
pytest (collecting only them) without importing the test machinery.
"""

SERIAL_FILES = frozenset({"test_fidelity.py", "test_repro_lian.py", "test_server_knee.py", "test_parallel_arms.py"})
