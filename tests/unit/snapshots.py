"""Builders of policy inputs for unit tests."""

from __future__ import annotations

from vcpusched.model import Snapshot, Vcpu, VcpuRef


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
        load=load,
        demand=load if demand is None else demand,
        affinity=affinity,
        excluded=excluded,
    )


def snapshot(
    vcpus: list[Vcpu], pcpus: int, background: dict[int, float] | None = None, cap: bool = True
) -> Snapshot:
    """Utilization as the host would measure it: pinned loads plus background, capped at 100;
    unpinned vCPUs are spread evenly over their allowed pCPUs. Without the cap, loads drawn
    at random stay consistent with the utilization even where no real host could run them."""
    util = {p: (background or {}).get(p, 0.0) for p in range(pcpus)}
    for v in vcpus:
        for p in v.affinity:
            if p in util:
                util[p] += v.load / len(v.affinity)
    return Snapshot(
        pcpu_load={p: min(100.0, u) if cap else u for p, u in util.items()}, vcpus=tuple(vcpus)
    )


def apply(snap: Snapshot, moves: list) -> dict[int, float]:
    """Demand per pCPU after the moves (excluded and unplaced vCPUs stay where they are)."""
    where = {v.ref: v.pcpu for v in snap.vcpus}
    for m in moves:
        where[m.ref] = m.dst
    demand: dict[int, float] = {p: 0.0 for p in snap.pcpu_load}
    for v in snap.vcpus:
        p = where[v.ref]
        if p is not None:
            demand[p] += v.demand
    return demand
