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

from typing import Any

# ``from zsgd.network import X`` finds X in these modules, the last first (as the star imports that were here
# did); they are imported at the first such look-up, not with the package: zsgd.network.knobs (which the CLI
# reads while registering its commands) must load without numpy, which delays, faults and trace import.
_EXPORTS = (("units", None), ("trace", ("MAX_TRACE_BYTES", "MAX_TRACE_ROWS", "Trace", "load_trace")), ("faults", None), ("delays", None))


def __getattr__(name: str) -> Any:
    from importlib import import_module

    if not name.startswith("_"):
        for module, names in _EXPORTS:
            if names is None or name in names:
                mod = import_module(f"zsgd.network.{module}")
                if hasattr(mod, name):
                    value = getattr(mod, name)
                    globals()[name] = value
                    return value
    raise AttributeError(f"module 'zsgd.network' has no attribute {name!r}")
