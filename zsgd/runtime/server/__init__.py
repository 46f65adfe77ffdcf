"""The server side of a real run: what the broker (``zsgd/broker.py``) is built from.

The endpoint (the ROUTER socket, CURVE, limits, tracked sends, the emulated
network's queue), the session (membership, the handshake and its
authentication, heartbeats), and the services plugged into them: the
parameter server, the range server of ``--servers K`` and its coordinator,
and the decentralized relay. Checkpoints are written here too.
"""
