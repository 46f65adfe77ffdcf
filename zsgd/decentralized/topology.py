"""Communication graphs for decentralized training, and their mixing weights.

A topology is a list of neighbour lists: node ``i`` talks to ``neighbours[i]``
and to nobody else (no broker in the maths; the runtime may still relay the
bytes). Specs, each seeded so every arm of an experiment builds the same graph:

- ``ring``: i talks to i-1 and i+1 (mod n); degree 2, the sparsest connected
  regular graph and the slowest to mix (spectral gap ~ 1/n^2).
- ``torus`` or ``torus:RxC``: a 2-D grid with wraparound, degree 4 when both
  sides are >= 3 (a side of 2 gives degree 3); without RxC the most square
  factorisation of n is used. Gap ~ 1/n: what a rack of machines on a mesh sees.
- ``wheel``: a hub (node 0) linked to a ring of the others; n >= 4. A
  star-like hotspot, useful to see what one high-degree node does.
- ``complete``: everyone talks to everyone: one round of Metropolis mixing
  is exact averaging, so DSGD becomes synchronous SGD (the sanity check).
- ``random-regular:D``: a uniformly random simple D-regular graph (n*D even,
  D < n), drawn with the pairing algorithm of Steger & Wormald (1999): pair
  random free half-edges, rejecting a pair that would make a loop or a double
  edge, and restart if the last few half-edges cannot be paired. Resampled
  until connected. Expanders: gap is O(1) for D >= 3.
- ``erdos-renyi:P``: each edge present with probability P, resampled until
  connected (P should exceed ln(n)/n, where G(n, P) becomes connected).

Mixing weights are Metropolis(-Hastings): ``W_ij = 1 / (1 + max(d_i, d_j))``
for each edge, ``W_ii = 1 - sum_j W_ij``. Why these: they need only the
neighbours' degrees (each node computes its own row locally), W is symmetric
and doubly stochastic for any graph (so the average of the nodes' models is
preserved by mixing), and every W_ii >= 1/(1+d_max) > 0, which keeps the
chain aperiodic, so repeated mixing converges to the exact average on any
connected graph (Xiao & Boyd 2004).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from zsgd.errors import ZsgdError

TOPOLOGY_HELP = "ring, torus[:RxC], wheel, complete, random-regular:D or erdos-renyi:P"
#: Resampling budget for random graphs. Connected draws are the common case
#: (>99% for random-regular with D >= 3); 200 failures means the spec cannot work.
MAX_DRAWS = 200
#: Edges a graph may have, checked before it is built (``complete`` on 10,000 nodes would be 50 million
#: neighbour entries, gigabytes, and a mixing round of 50 million model-sized sums). A million edges is
#: already a complete graph on 1,414 nodes, or random-regular:8 on 250,000.
MAX_EDGES = 1_000_000


@dataclass(frozen=True)
class MixingRow:
    """Node i's row of W: its own weight and its neighbours' (aligned with ``neighbours``)."""

    node: int
    self_weight: float
    neighbours: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Topology:
    """An undirected simple graph on nodes 0..n-1 as sorted neighbour tuples."""

    spec: str
    n: int
    neighbours: tuple[tuple[int, ...], ...]

    @property
    def degrees(self) -> list[int]:
        return [len(nb) for nb in self.neighbours]

    @property
    def n_edges(self) -> int:
        return sum(self.degrees) // 2

    def is_connected(self) -> bool:
        return _connected(self.neighbours)

    def row(self, i: int) -> MixingRow:
        """Metropolis weights of node i, computed from degrees only (what a real node can do)."""
        d = self.degrees
        ws = tuple(1.0 / (1.0 + max(d[i], d[j])) for j in self.neighbours[i])
        return MixingRow(i, 1.0 - math.fsum(ws), self.neighbours[i], ws)

    @cached_property
    def rows(self) -> tuple[MixingRow, ...]:
        return tuple(self.row(i) for i in range(self.n))

    def mixing_matrix(self) -> np.ndarray:
        """Dense float64 W (n x n): for tests, spectra and small-n analysis."""
        w = np.zeros((self.n, self.n))
        for r in self.rows:
            w[r.node, r.node] = r.self_weight
            w[r.node, list(r.neighbours)] = r.weights
        return w

    def spectral_gap(self) -> float | None:
        """1 - |second largest eigenvalue of W|: the consensus rate per round (None above 1024 nodes).

        Disagreement between nodes shrinks by about (1 - gap) per round of mixing,
        so it explains why a ring (gap ~ 1/n^2) lags a random-regular graph (gap ~ const).
        """
        if self.n == 1:
            return 1.0
        if self.n > 1024:
            return None
        ev = np.sort(np.abs(np.linalg.eigvalsh(self.mixing_matrix())))
        return float(1.0 - ev[-2])

    def describe(self) -> dict[str, object]:
        d = self.degrees
        gap = self.spectral_gap()
        return {"topology": self.spec, "n_nodes": self.n, "n_edges": self.n_edges, "degree_min": min(d),
                "degree_max": max(d), "spectral_gap": None if gap is None else round(gap, 6)}


def _connected(neighbours: tuple[tuple[int, ...], ...] | list) -> bool:
    n = len(neighbours)
    seen = np.zeros(n, bool)
    seen[0] = True
    stack = [0]
    while stack:
        i = stack.pop()
        for j in neighbours[i]:
            if not seen[j]:
                seen[j] = True
                stack.append(j)
    return bool(seen.all())


def _from_edges(spec: str, n: int, edges: set[tuple[int, int]]) -> Topology:
    nb: list[set[int]] = [set() for _ in range(n)]
    for a, b in edges:
        if a != b:
            nb[int(a)].add(int(b))
            nb[int(b)].add(int(a))
    return Topology(spec, n, tuple(tuple(sorted(s)) for s in nb))


def _rng(seed: int, kind: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(kind.encode())]))


def ring(n: int) -> Topology:
    return _from_edges("ring", n, {(i, (i + 1) % n) for i in range(n)})


def torus(n: int, rows: int | None = None, cols: int | None = None) -> Topology:
    if rows is None or cols is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
        cols = n // rows
        spec = "torus"
    else:
        spec = f"torus:{rows}x{cols}"
    if rows * cols != n:
        raise ZsgdError(f"bad topology {spec!r}: {rows}x{cols} is {rows * cols} nodes, not {n}")
    if min(rows, cols) < 2:
        raise ZsgdError(f"bad topology {spec!r}: {n} nodes do not make a 2-D torus (n is prime or too small): use ring")
    edges = set()
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges.add((i, r * cols + (c + 1) % cols))
            edges.add((i, ((r + 1) % rows) * cols + c))
    return _from_edges(spec, n, edges)


def wheel(n: int) -> Topology:
    if n < 4:
        raise ZsgdError(f"bad topology 'wheel': needs at least 4 nodes (a hub and a ring of 3), got {n}")
    rim = list(range(1, n))
    edges = {(0, i) for i in rim} | {(rim[k], rim[(k + 1) % len(rim)]) for k in range(len(rim))}
    return _from_edges("wheel", n, edges)


def complete(n: int) -> Topology:
    return Topology("complete", n, tuple(tuple(j for j in range(n) if j != i) for i in range(n)))


def _pairing(n: int, d: int, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    """One attempt of the Steger-Wormald pairing: None if it gets stuck."""
    stubs = np.repeat(np.arange(n), d)
    rng.shuffle(stubs)
    free = list(stubs)
    edges: set[tuple[int, int]] = set()
    while free:
        m = len(free)
        for _ in range(4 * m + 16):  # random pairs: almost always succeeds in a few tries
            a, b = rng.integers(m, size=2)
            u, v = free[a], free[b]
            e = (min(u, v), max(u, v))
            if a != b and u != v and e not in edges:
                break
        else:  # near the end: check exhaustively whether any valid pair remains
            pairs = [(a, b) for a in range(m) for b in range(a + 1, m)
                     if free[a] != free[b] and (min(free[a], free[b]), max(free[a], free[b])) not in edges]
            if not pairs:
                return None
            a, b = pairs[int(rng.integers(len(pairs)))]
            u, v = free[a], free[b]
            e = (min(u, v), max(u, v))
        edges.add(e)
        for k in sorted((a, b), reverse=True):
            free[k] = free[-1]
            free.pop()
    return edges


def random_regular(n: int, d: int, seed: int) -> Topology:
    spec = f"random-regular:{d}"
    if d < 1 or d >= n or (n * d) % 2:
        raise ZsgdError(f"bad topology {spec!r} for {n} nodes: needs 1 <= D < n and n*D even")
    if d == n - 1:
        return Topology(spec, n, complete(n).neighbours)
    rng = _rng(seed, "random-regular")
    if 2 * d > n - 1:
        # Dense: pairing stubs gets stuck (few free pairs remain), so draw the sparse
        # complement, (n-1-D)-regular, and invert it. The map is a bijection, so the
        # draw stays uniform, and a graph whose degree exceeds (n-1)/2 is always
        # connected (two non-adjacent nodes share a neighbour).
        for _ in range(MAX_DRAWS):
            sparse = _pairing(n, n - 1 - d, rng)
            if sparse is not None:
                return _from_edges(spec, n, {(i, j) for i in range(n) for j in range(i + 1, n)} - sparse)
        raise ZsgdError(f"could not draw a {d}-regular graph on {n} nodes in {MAX_DRAWS} tries")
    for _ in range(MAX_DRAWS):
        edges = _pairing(n, d, rng)
        if edges is not None:
            top = _from_edges(spec, n, edges)
            if top.is_connected():
                return top
    raise ZsgdError(f"could not draw a connected {d}-regular graph on {n} nodes in {MAX_DRAWS} tries: use a larger D")


def erdos_renyi(n: int, p: float, seed: int) -> Topology:
    spec = f"erdos-renyi:{p:g}"
    if not 0 < p <= 1:
        raise ZsgdError(f"bad topology {spec!r}: P must be in (0, 1]")
    rng = _rng(seed, "erdos-renyi")
    iu = np.triu_indices(n, k=1)
    for _ in range(MAX_DRAWS):
        keep = rng.random(len(iu[0])) < p  # one vectorised draw per graph
        top = _from_edges(spec, n, set(zip(iu[0][keep].tolist(), iu[1][keep].tolist())))
        if n == 1 or top.is_connected():
            return top
    hint = math.log(n) / n
    raise ZsgdError(f"topology {spec!r} on {n} nodes was disconnected in {MAX_DRAWS} draws: use P above ln(n)/n = {hint:.3g}, e.g. {min(1.0, 2 * hint):.2g}")


def _check_size(spec: str, n: int, edges: int) -> None:
    """Refuse a graph of more than ``MAX_EDGES`` edges (or candidate pairs) before building it."""
    if edges > MAX_EDGES:
        raise ZsgdError(f"topology {spec!r} on {n:,} nodes has {edges:,} edges (or candidate pairs), more than the "
                        f"{MAX_EDGES:,} a graph may have: use a sparser one (ring, torus, random-regular:D) or fewer workers")


def parse_topology(spec: str, n: int, seed: int = 0) -> Topology:
    """Spec text -> a connected Topology on ``n`` nodes; ZsgdError names a bad spec (or one too large to build)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ZsgdError(f"a topology needs a whole number of nodes >= 1, got {n!r}")
    text = str(spec).strip().lower()
    kind, sep, arg = text.partition(":")
    pairs = n * (n - 1) // 2
    if kind in ("complete", "erdos-renyi"):  # erdos-renyi draws from every candidate pair
        _check_size(text, n, pairs)
    elif kind == "random-regular" and re.fullmatch(r"\d{1,6}", arg):  # dense D builds the complement from every pair
        d = int(arg)
        _check_size(text, n, pairs if 2 * d > n - 1 else n * d // 2)
    if n == 1 and kind in ("ring", "torus", "wheel", "complete") and not sep:
        return Topology(kind, 1, ((),))  # a single node trains alone
    if kind in ("ring", "wheel", "complete") and not sep:
        return {"ring": ring, "wheel": wheel, "complete": complete}[kind](n)
    if kind == "torus":
        if not sep:
            return torus(n)
        m = re.fullmatch(r"(\d{1,6})x(\d{1,6})", arg)
        if m is None:
            raise ZsgdError(f"bad topology {spec!r}: use torus or torus:RxC, e.g. torus:4x4")
        return torus(n, int(m.group(1)), int(m.group(2)))
    if kind == "random-regular" and sep:
        if not re.fullmatch(r"\d{1,6}", arg):
            raise ZsgdError(f"bad topology {spec!r}: D in random-regular:D must be a whole number, e.g. random-regular:4")
        return random_regular(n, int(arg), seed)
    if kind == "erdos-renyi" and sep:
        try:
            p = float(arg)
        except ValueError:
            p = math.nan
        if not 0 < p <= 1:
            raise ZsgdError(f"bad topology {spec!r}: P in erdos-renyi:P must be in (0, 1], e.g. erdos-renyi:0.3")
        return erdos_renyi(n, p, seed)
    raise ZsgdError(f"unknown topology {spec!r}: use {TOPOLOGY_HELP}")
