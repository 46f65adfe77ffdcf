"""The broker: the entry point of zsgd's server side.

A ZeroMQ ROUTER in front of a training service, built from parts that live in
``zsgd.runtime.server``: the endpoint (socket, CURVE, limits), the session
(who is in the run, the handshake and its run secret, heartbeats), a service
(the parameter server, a range server, the decentralized relay) and the run
ledger. ``zsgd run`` and ``zsgd broker`` build one through
``zsgd.runtime.runner``; this module names what a user of the library needs,
and nothing in the package imports it back.
"""

from __future__ import annotations

from zsgd.runtime.server.broker import Broker, BrokerOptions, parameter_server

__all__ = ["Broker", "BrokerOptions", "parameter_server"]
