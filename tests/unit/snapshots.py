"""Builders of policy inputs for unit tests."""

from __future__ import annotations

from dataclasses import replace

from vcpusched.model import Snapshot, Vcpu, VcpuRef
from vcpusched_sim.host import fair_shares


def vcpu(
    name: str,
    load: float,
    pcpu: int | set[int] | None,
    *,
    demand: float | None = None,
    excluded: bool = False,
    index: int = 0,
    pcpus: int = 2,
) -> Vcpu:
    if pcpu is None:
        affinity = frozenset(range(pcpus))
    elif isinstance(pcpu, set):
        affinity = frozenset(pcpu)
    else:
        affinity = frozenset((pcpu,))
    return Vcpu(
        ref=VcpuRef(name, index),
        received=load,
        demand=load if demand is None else demand,
        affinity=affinity,
        excluded=excluded,
    )


def snapshot(
    vcpus: list[Vcpu], pcpus: int, background: dict[int, float] | None = None, cap: bool = True
) -> Snapshot:
    """Utilization as the host would measure it. With `cap`, a pCPU shares its time max-min
    fairly, as the kernel does: each pinned vCPU's received `load` is recomputed from the
    demands, and utilization stops at 100. Without it, the loads are taken as given and may add
    up past 100, which no host shows but which exercises the arithmetic alone. Unpinned vCPUs
    are spread evenly over their allowed pCPUs."""
    background = background or {}
    util = {p: background.get(p, 0.0) for p in range(pcpus)}
    out = list(vcpus)
    if cap:
        for p in range(pcpus):
            members = [i for i, v in enumerate(out) if v.pcpu == p]
            shares = fair_shares([out[i].demand for i in members], 100.0 - util[p])
            for i, share in zip(members, shares, strict=True):
                out[i] = replace(out[i], received=share)
    for v in out:
        for p in v.affinity:
            if p in util:
                util[p] += v.received / len(v.affinity)
    return Snapshot(
        util={p: min(100.0, u) if cap else u for p, u in util.items()}, vcpus=tuple(out)
    )


def apply(snap: Snapshot, moves: list) -> dict[int, float]:
    """Demand per pCPU after the moves (excluded and unplaced vCPUs stay where they are)."""
    where = {v.ref: v.pcpu for v in snap.vcpus}
    for m in moves:
        where[m.ref] = m.dst
    demand: dict[int, float] = {p: 0.0 for p in snap.util}
    for v in snap.vcpus:
        p = where[v.ref]
        if p is not None:
            demand[p] += v.demand
    return demand
