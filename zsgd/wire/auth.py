"""The run secret: how a run without CURVE still admits only the processes it started.

Why: a broker on loopback without ``--secure`` used to admit any process on
the machine that spoke the protocol, so another user's process could join as
a worker or an evaluator, feed the run gradients or fake accuracies, and
stop it. CURVE closes that, but it encrypts every byte: on the 4.8 MB
exchange of the cnn that costs more than the exchange itself
(docs/benchmarks.md, "Authentication"). A run secret costs nothing per
message:

- each run makes a random 256-bit token and hands it only to the processes
  it starts, over the channel that carries CURVE keys (a stdin pipe for
  forked and exec'd workers, the SSH channel for remote ones, a 0600 file for
  workers started by hand);
- the HELLO that joins carries a proof, HMAC-SHA256(token, role and id),
  compared in constant time; a HELLO without a valid proof is refused and
  counted in ``refused_clients``, and it learns nothing (not even the run id);
- the routing identity of an admitted peer is derived from the token too, so
  no other process can guess it and take over a live worker's route with
  ``ROUTER_HANDOVER``: whatever it sends comes from an unknown peer.

Nothing secret travels on the wire in clear: the proof is bound to the role
and id it joins as, and reveals nothing of the token. With CURVE on, the
ZAP allow-list authenticates instead, and proofs are not asked for.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_BYTES = 32
TOKEN_HEX = 2 * TOKEN_BYTES


def new_token() -> str:
    """A fresh run secret (64 hex characters)."""
    return secrets.token_hex(TOKEN_BYTES)


def is_token(value: object) -> bool:
    """True for a well-formed run secret (what a keys line or file must hold)."""
    return isinstance(value, str) and len(value) == TOKEN_HEX and all(c in "0123456789abcdef" for c in value)


def _mac(token: str, text: str) -> str:
    return hmac.new(bytes.fromhex(token), text.encode("utf-8"), hashlib.sha256).hexdigest()


def hello_proof(token: str, role: str, worker: int | None) -> str:
    """What a HELLO join carries to show it was started by the run: bound to its role and requested id."""
    return _mac(token, f"zsgd-hello:{role}:{-1 if worker is None else int(worker)}")


def check_proof(token: str, role: str, worker: object, proof: object) -> bool:
    """Constant-time check of a HELLO's proof; anything malformed is simply wrong."""
    if not isinstance(proof, str) or len(proof) != 64 or not isinstance(worker, int) or isinstance(worker, bool):
        return False
    return hmac.compare_digest(proof, hello_proof(token, role, worker))


def secret_identity(token: str, role: str, worker: int) -> bytes:
    """A routing identity only a holder of the token can know: stable across a worker's restarts."""
    return f"zsgd-{role[0]}{int(worker)}-{_mac(token, f'zsgd-identity:{role}:{int(worker)}')[:24]}".encode("ascii")
