"""Starting a run's processes: where they connect, with which keys, and who starts them.

``access`` decides the bind address, CURVE or the run secret, and the
launchers; ``local`` starts processes on this machine (``forked`` from the
warmed-up run process where that is safe), ``slurm`` as an srun step, and
``zsgd.remote`` over SSH. ``ranks`` reads the rank a foreign launcher
(mpirun, srun, PMI) gave a worker.
"""
