"""The worker side of a real run: what a ``zsgd worker`` process runs besides ``zsgd/node.py``.

What a worker is told at start and how it speaks (``node_options``), how it
decodes its broker's replies and stretches an emulated step (``replies``),
and the loops of the workers that are not the single-broker kind: a worker
of K sharded servers and a decentralized node.
"""
