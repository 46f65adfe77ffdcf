"""The network around training -- one model for ``zsgd sim``, the decentralized simulator and a real run's emulation: delays, bandwidth, loss, compute time,
stragglers and failures, with one spec syntax for simulation and emulation.

``zsgd sim`` samples these models on a virtual clock; ``zsgd run`` can delay
real messages by samples of the very same objects (``zsgd.runtime.emulation``),
so a delay studied in the simulator is the delay injected into a real run.
Each model is a small object with ``sample(rng) -> seconds``; each parser
turns a user's text into one and raises ``ZsgdError`` naming the bad value.

Spec syntax (the same in flags and YAML):

- durations: ``0``, ``10ms``, ``0.5s``, ``250us``, ``2min``. A bare number
  other than 0 is an error (is ``10`` ten seconds or ten milliseconds?),
  except inside a list where the unit of a neighbour applies:
  ``0,10,50,200ms`` means 0, 10, 50 and 200 ms, ``uniform:5,20ms`` means 5 to
  20 ms.
- delay distributions: ``uniform:LO,HI``, ``normal:MEAN,SD`` (clipped at 0),
  ``lognormal:MEDIAN,SIGMA`` (SIGMA unitless; heavy right tail, the usual fit
  for WAN round trips), ``exp:MEAN``, ``shifted-exp:SHIFT,MEAN`` (SHIFT plus an
  exponential of mean MEAN: the compute-time model of the K-sync/K-async
  analyses, Dutta et al. 2018), ``trace:FILE.csv`` (first column:
  measured samples in milliseconds, resampled uniformly).
- bandwidth: ``100Mbps``, ``1Gbps`` (bits/s), ``10MB/s``, ``1GiB/s``
  (bytes/s), ``inf``.
- loss: ``0.01`` or ``1%``, the chance that a message is lost and resent
  after ``--retransmit`` (geometric number of resends).
- stragglers: ``FRACTION:FACTORx`` (a seeded choice of workers computes
  FACTOR times slower for the whole run) or
  ``FRACTION:FACTORx,transient:MEAN_PERIOD_S:MEAN_DURATION_S`` (those workers
  are slow only during random episodes: exponential gaps of mean PERIOD
  between episodes of exponential length of mean DURATION).
- failures: ``W@T[+RECOVER]`` items (``3@10s+5s``: worker 3 dies at virtual
  10 s and rejoins 5 s later; ``0-7@60s``: workers 0..7 die for good) or
  ``rate:R[+RECOVER]`` (each worker fails as a Poisson process of R failures
  per second).
"""

from __future__ import annotations

from zsgd.network.delays import *  # noqa: F401,F403
from zsgd.network.faults import *  # noqa: F401,F403
from zsgd.network.trace import MAX_TRACE_BYTES, MAX_TRACE_ROWS, Trace, load_trace  # noqa: F401
from zsgd.network.units import *  # noqa: F401,F403
