"""The sans-IO server engine shared by every driver of a central server (``server_engine``).

It sits below both drivers -- the ZeroMQ runtime (``zsgd.runtime.server``)
and the simulator (``zsgd.simulation``) -- and above what it drives: the
server algorithms, the wire's message checks and the ledger.
"""

from zsgd.engine.server_engine import ServerEngine, ServerPort

__all__ = ["ServerEngine", "ServerPort"]
