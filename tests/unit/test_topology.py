"""The host topology and domain memory placement parsers, on capabilities XML modelled on real
hosts, on generated hosts numbered at random, and on libvirt's test driver through the real
libvirt module."""

from __future__ import annotations

import random
from pathlib import Path

import libvirt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpusched.libvirt_host import LibvirtHost, read_resident
from vcpusched.topology import (
    MemoryPlacement,
    Topology,
    TopologyError,
    parse_capabilities,
    parse_cpulist,
    parse_memory_placement,
    parse_numa_maps,
    resident_node,
)

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> Topology:
    return parse_capabilities((FIXTURES / f"caps-{name}.xml").read_text())


# -- hosts as they are ----------------------------------------------------------------------


def test_two_sockets_threads_n_and_n_plus_16() -> None:
    t = fixture("2s8c2t-split")
    assert t.nodes == {
        0: frozenset([*range(8), *range(16, 24)]),
        1: frozenset([*range(8, 16), *range(24, 32)]),
    }
    assert len(t.cores) == 16
    assert t.threads_per_core == 2
    for cpu in range(16):
        assert t.siblings_of(cpu) == {cpu, cpu + 16}
        assert t.siblings_of(cpu + 16) == {cpu, cpu + 16}
    # The neighbour by number is another core: arithmetic on ids would get this wrong.
    assert t.siblings_of(0) != {0, 1}
    assert t.node_of(8) == 1
    assert t.node_of(24) == 1
    assert t.node_of(16) == 0
    assert t.cpus[9].socket == 1
    assert t.cpus[9].core == 1
    assert t.distance(0, 1) == 21
    assert t.distance(1, 1) == 10
    assert t.node_list[0].memory_kib == 65843208
    assert t.caches == ()
    assert t.cache_group_of(0) is None
    assert t.multi_node
    # A value: equal when parsed twice, and usable as a key.
    assert hash(t) == hash(fixture("2s8c2t-split"))
    assert t == fixture("2s8c2t-split")


def test_two_sockets_threads_n_and_n_plus_1_with_l3_banks() -> None:
    t = fixture("2s8c2t-adjacent")
    assert t.nodes == {0: frozenset(range(16)), 1: frozenset(range(16, 32))}
    assert len(t.cores) == 16
    for cpu in range(0, 32, 2):
        assert t.siblings_of(cpu) == {cpu, cpu + 1} == t.siblings_of(cpu + 1)
    # Core ids are sparse and repeat across sockets; the core is its set of threads.
    assert t.cpus[8].core == t.cpus[24].core == 8
    assert t.siblings_of(8) != t.siblings_of(24)
    assert t.cpus[8].cluster == 1
    assert t.cpus[7].cluster == 0
    groups = {t.cache_group_of(c) for c in range(32)}
    assert groups == {frozenset(range(g, g + 8)) for g in (0, 8, 16, 24)}
    assert all(b.level == 3 and b.size == 16 << 20 for b in t.caches)
    assert t.summary() == {"nodes": "0:0-15/1:16-31", "cores": 16, "threads": 2, "llc": 4}


def test_four_nodes_with_an_offline_cpu() -> None:
    t = fixture("4node-snc")
    assert sorted(t.nodes) == [0, 1, 2, 3]
    assert t.nodes[3] == {12, 14, 15, 28, 29, 30, 31}
    assert t.node_of(13) is None  # offline: libvirt does not list it
    assert t.siblings_of(13) == {13}
    assert t.siblings_of(29) == {29}  # its sibling is offline: a core of one thread
    assert t.siblings_of(12) == {12, 28}
    assert t.cpus[5].die == 1
    assert t.cpus[1].die == 0
    assert t.cpus[5].socket == 0
    assert t.distance(0, 1) == 11
    assert t.distance(0, 2) == 21
    assert t.distance(2, 3) == 11
    assert t.cache_group_of(29) == t.nodes[3]
    assert t.cache_group_of(5) == t.nodes[1]
    assert t.cpus_of_nodes([0, 3]) == t.nodes[0] | t.nodes[3]
    assert len(t.cores) == 16  # 15 two-thread cores and 29 alone


def test_restricted_to_online_cpus() -> None:
    t = fixture("2s8c2t-adjacent").restricted(set(range(32)) - {1, 16, 17})
    assert t.node_of(1) is None
    assert t.siblings_of(0) == {0}
    assert t.siblings_of(16) == {16}  # unknown now
    assert t.nodes[1] == frozenset(range(18, 32))
    assert t.cache_group_of(0) == frozenset(range(8)) - {1}
    assert t.cache_group_of(18) == frozenset(range(18, 24))
    assert fixture("2s8c2t-split").restricted(range(32)) == fixture("2s8c2t-split")


def test_unknown_and_flat_topologies() -> None:
    empty = Topology()
    assert empty.nodes == {}
    assert empty.cores == ()
    assert not empty.multi_node
    assert empty.node_of(3) is None
    assert empty.siblings_of(3) == {3}
    assert empty.cache_group_of(3) is None
    assert empty.distance(0, 0) is None
    flat = Topology.flat(range(4))
    assert flat.nodes == {0: frozenset(range(4))}
    assert not flat.multi_node
    assert flat.cores == tuple(frozenset((c,)) for c in range(4))
    assert flat.node_of(2) == 0
    assert flat.node_of(9) is None


def test_cpu_without_topology_attributes_is_a_core_alone() -> None:
    xml = (
        "<capabilities><host><topology><cells num='1'><cell id='0'>"
        "<cpus num='2'><cpu id='0'/><cpu id='1'/></cpus></cell></cells></topology>"
        "</host></capabilities>"
    )
    t = parse_capabilities(xml)
    assert t.cores == (frozenset((0,)), frozenset((1,)))
    assert t.cpus[0].socket is None
    assert t.cpus[0].core is None
    assert t.node_list[0].memory_kib is None
    assert t.node_list[0].distances == {}


# -- any numbering --------------------------------------------------------------------------


@st.composite
def hosts(draw: st.DrawFn) -> tuple[list[list[list[int]]], str]:
    """A host of sockets x cores x threads whose CPU ids are a random permutation, as XML."""
    sockets = draw(st.integers(1, 4))
    cores = draw(st.integers(1, 6))
    threads = draw(st.integers(1, 4))
    ids = list(range(sockets * cores * threads))
    random.Random(draw(st.integers(0, 2**32))).shuffle(ids)
    it = iter(ids)
    layout = [[[next(it) for _ in range(threads)] for _ in range(cores)] for _ in range(sockets)]
    cells = []
    for s, socket in enumerate(layout):
        cpus = "".join(
            f"<cpu id='{cpu}' socket_id='{s}' die_id='0' core_id='{c}' "
            f"siblings='{','.join(map(str, sorted(core)))}'/>"
            for c, core in enumerate(socket)
            for cpu in core
        )
        bank = ",".join(str(cpu) for core in socket for cpu in core)
        cells.append((f"<cell id='{s}'><cpus num='{cores * threads}'>{cpus}</cpus></cell>", bank))
    xml = (
        "<capabilities><host><topology><cells>"
        + "".join(c for c, _ in cells)
        + "</cells></topology><cache>"
        + "".join(
            f"<bank id='{i}' level='3' type='both' size='8' unit='MiB' cpus='{b}'/>"
            for i, (_, b) in enumerate(cells)
        )
        + "</cache></host></capabilities>"
    )
    return layout, xml


@settings(max_examples=200, deadline=None)
@given(hosts())
def test_structure_is_read_not_guessed_from_numbers(
    host: tuple[list[list[list[int]]], str],
) -> None:
    layout, xml = host
    t = parse_capabilities(xml)
    assert sorted(t.nodes) == list(range(len(layout)))
    for s, socket in enumerate(layout):
        members = {cpu for core in socket for cpu in core}
        assert t.nodes[s] == members
        for core in socket:
            for cpu in core:
                assert t.siblings_of(cpu) == set(core)
                assert t.node_of(cpu) == s
                assert t.cache_group_of(cpu) == members
    assert sorted(map(sorted, t.cores)) == sorted(sorted(c) for s in layout for c in s)


# -- bad input: one line naming the part ----------------------------------------------------

CELL = "<capabilities><host><topology><cells>{}</cells></topology>{}</host></capabilities>"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<capabilities><host>", "capabilities: not XML"),
        ("<domain/>", "root element is <domain>"),
        ("<capabilities/>", "no <host>"),
        (CELL.format("<cell><cpus/></cell>", ""), "<cell>: missing id"),
        (CELL.format("<cell id='x'/>", ""), "id must be an integer, got 'x'"),
        (
            CELL.format("<cell id='0'><cpus><cpu id='1'/></cpus></cell>" * 2, ""),
            "cell 0: listed twice",
        ),
        (
            CELL.format(
                "<cell id='0'><cpus><cpu id='1'/></cpus></cell>"
                "<cell id='1'><cpus><cpu id='1'/></cpus></cell>",
                "",
            ),
            "cpu 1: also in cell 0",
        ),
        (
            CELL.format("<cell id='0'><cpus><cpu id='1' siblings='2'/></cpus></cell>", ""),
            "siblings '2' do not include it",
        ),
        (
            CELL.format("<cell id='0'><cpus><cpu id='1' siblings='1-x'/></cpus></cell>", ""),
            "invalid range '1-x'",
        ),
        (
            CELL.format(
                "<cell id='0'><cpus><cpu id='0' siblings='0-1'/><cpu id='1' siblings='1'/>"
                "</cpus></cell>",
                "",
            ),
            "cpu 0 and its sibling 1 disagree",
        ),
        (
            CELL.format(
                "<cell id='0'><cpus><cpu id='0' socket_id='s'/></cpus></cell>",
                "",
            ),
            "socket_id must be an integer",
        ),
        (
            CELL.format("", "<cache><bank id='0' level='3' size='8' unit='XB' cpus='0'/></cache>"),
            "unknown unit 'XB'",
        ),
    ],
)
def test_bad_capabilities_are_one_line(xml: str, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_capabilities(xml)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cpulist() -> None:
    assert parse_cpulist("0-3,8,^2") == {0, 1, 3, 8}
    assert parse_cpulist("") == frozenset()
    assert parse_cpulist(" 5 ") == {5}
    with pytest.raises(TopologyError, match="invalid range '3-1'"):
        parse_cpulist("3-1")


# -- memory placement -----------------------------------------------------------------------


def domain(body: str) -> str:
    return f"<domain type='kvm'><name>g</name>{body}</domain>"


def test_strict_nodeset_confines_every_vcpu_to_its_nodes() -> None:
    p = parse_memory_placement(
        domain("<vcpu>4</vcpu><numatune><memory mode='strict' nodeset='1'/></numatune>")
    )
    assert (p.mode, p.nodeset, p.auto) == ("strict", frozenset({1}), False)
    assert p.binding
    split = fixture("2s8c2t-split")
    assert p.allowed_cpus(0, split) == split.nodes[1]
    assert p.allowed_cpus(3, split) == frozenset([*range(8, 16), *range(24, 32)])
    # A topology that does not know node 1 cannot say which pCPUs those are.
    assert p.allowed_cpus(0, Topology()) is None


@pytest.mark.parametrize(
    ("numatune", "mode", "nodeset", "binding"),
    [
        ("", None, None, False),
        ("<numatune><memory nodeset='0-1'/></numatune>", "strict", {0, 1}, True),
        ("<numatune><memory mode='restrictive' nodeset='0'/></numatune>", "restrictive", {0}, True),
        ("<numatune><memory mode='preferred' nodeset='0'/></numatune>", "preferred", {0}, False),
        (
            "<numatune><memory mode='interleave' nodeset='0-1'/></numatune>",
            "interleave",
            {0, 1},
            False,
        ),
        ("<numatune><memory mode='strict' placement='auto'/></numatune>", "strict", None, False),
    ],
)
def test_memory_modes(
    numatune: str, mode: str | None, nodeset: set[int] | None, binding: bool
) -> None:
    p = parse_memory_placement(domain(f"<vcpu placement='static'>2</vcpu>{numatune}"))
    assert p.mode == mode
    assert p.nodeset == (None if nodeset is None else frozenset(nodeset))
    assert p.binding is binding
    assert (p.allowed_cpus(0, fixture("2s8c2t-split")) is not None) is binding


def test_vcpu_placement_auto_implies_strict_auto_memory() -> None:
    p = parse_memory_placement(domain("<vcpu placement='auto'>2</vcpu>"))
    assert (p.mode, p.nodeset, p.auto) == ("strict", None, True)
    assert not p.binding  # the nodes are libvirt's choice at start, read from the host
    # A nodeset given with the vCPUs placed automatically makes the memory static.
    p = parse_memory_placement(
        domain("<vcpu placement='auto'>2</vcpu><numatune><memory nodeset='0'/></numatune>")
    )
    assert (p.mode, p.nodeset, p.auto) == ("strict", frozenset({0}), False)


def test_memnode_binds_one_guest_cell() -> None:
    p = parse_memory_placement(
        domain(
            "<vcpu>4</vcpu><numatune><memory mode='interleave' nodeset='0-1'/>"
            "<memnode cellid='1' mode='strict' nodeset='1'/></numatune>"
            "<cpu><numa><cell id='0' cpus='0-1' memory='1' unit='GiB'/>"
            "<cell id='1' cpus='2-3' memory='1' unit='GiB'/></numa></cpu>"
        )
    )
    assert p.binding
    assert p.cells == ((0, frozenset({0, 1})), (1, frozenset({2, 3})))
    assert p.nodes_for(0) is None
    assert p.nodes_for(2) == {1}
    t = fixture("2s8c2t-adjacent")
    assert p.allowed_cpus(1, t) is None
    assert p.allowed_cpus(3, t) == frozenset(range(16, 32))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("<vcpu>1", "domain XML: not XML"),
        ("<numatune><memory mode='bogus' nodeset='0'/></numatune>", "unknown mode 'bogus'"),
        ("<numatune><memory mode='strict'/></numatune>", "no nodeset and placement is not 'auto'"),
        ("<numatune><memory placement='dynamic'/></numatune>", "unknown placement 'dynamic'"),
        ("<numatune><memory nodeset='a'/></numatune>", "nodeset: invalid range 'a'"),
        ("<numatune><memnode cellid='0' mode='strict'/></numatune>", "memnode 0: missing nodeset"),
    ],
)
def test_bad_domain_xml_is_one_line(body: str, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_memory_placement(domain(body))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(TopologyError, match="root element is <capabilities>"):
        parse_memory_placement("<capabilities/>")


# -- libvirt's test driver, through the real libvirt module ---------------------------------


def test_test_driver_default_host_has_two_cells_of_eight() -> None:
    conn = libvirt.open("test:///default")
    try:
        t = parse_capabilities(conn.getCapabilities())
    finally:
        conn.close()
    assert t.nodes == {0: frozenset(range(8)), 1: frozenset(range(8, 16))}
    assert all(t.siblings_of(c) == {c} for c in range(16))
    assert t.cpus[9].socket == 1
    assert t.cpus[9].core == 1
    assert t.caches == ()
    host = LibvirtHost("test:///default")
    try:
        sample = host.sample()
    finally:
        host.close()
    # The driver's CPU map is hard-coded: 8 present, 0, 2 and 4 online. Only those are sampled,
    # and the topology the host hands on knows only those.
    assert set(sample.pcpu_busy_ns) == {0, 2, 4}
    assert sample.topology == t.restricted({0, 2, 4})
    assert sample.topology.nodes == {0: {0, 2, 4}, 1: frozenset()}
    assert sample.topology.node_of(1) is None
    assert sample.topology.node_of(4) == 0
    assert sample.memory == {"test": MemoryPlacement()}


TEST_NODE = """<node>
  <domain type='test'>
    <name>numa-strict</name><memory unit='MiB'>256</memory>
    <vcpu placement='static'>2</vcpu>
    <numatune><memory mode='strict' nodeset='1'/></numatune>
    <os><type arch='x86_64'>hvm</type></os>
  </domain>
  <domain type='test'>
    <name>numa-auto</name><memory unit='MiB'>256</memory>
    <vcpu placement='auto'>1</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
  </domain>
  <domain type='test'>
    <name>numa-cells</name><memory unit='MiB'>256</memory>
    <vcpu placement='static'>4</vcpu>
    <numatune><memory mode='interleave' nodeset='0-1'/>
      <memnode cellid='1' mode='strict' nodeset='1'/></numatune>
    <cpu><numa><cell id='0' cpus='0-1' memory='128' unit='MiB'/>
      <cell id='1' cpus='2-3' memory='128' unit='MiB'/></numa></cpu>
    <os><type arch='x86_64'>hvm</type></os>
  </domain>
</node>
"""


def test_test_driver_domain_numatune_through_libvirt_host(tmp_path: Path) -> None:
    """A custom test-driver host keeps each domain's <numatune>; its capabilities list no
    cells at all, so the topology is unknown there."""
    path = tmp_path / "node.xml"
    path.write_text(TEST_NODE)
    host = LibvirtHost(f"test://{path}")
    try:
        sample = host.sample()
    finally:
        host.close()
    assert sample.topology == Topology()
    memory = sample.memory
    assert set(memory) == {"numa-strict", "numa-auto", "numa-cells"}
    assert (memory["numa-strict"].mode, memory["numa-strict"].nodeset) == ("strict", {1})
    assert memory["numa-strict"].binding
    # libvirt adds <memory mode='strict' placement='auto'/> for <vcpu placement='auto'>; the
    # test driver chooses no nodes (numa_nodeset ''), so nothing is bound yet.
    auto = memory["numa-auto"]
    assert (auto.mode, auto.auto, auto.nodeset, auto.binding) == ("strict", True, None, False)
    cells = memory["numa-cells"]
    assert cells.mode == "interleave"
    assert cells.nodes_for(3) == {1}
    assert cells.nodes_for(0) is None


# -- where a guest's memory is: numa_maps of its QEMU process --------------------------------

# Lines of the kinds a QEMU process shows: its binary, guest RAM in 4 KiB pages and in huge
# pages, a shared library, a mapping with no page present, and a bad token.
NUMA_MAPS = """\
55d0c0a00000 default file=/usr/bin/qemu-system-x86_64 mapped=1200 N0=1200 kernelpagesize_kB=4
7f3a00000000 default anon=262144 dirty=262144 active=0 N0=2144 N1=260000 kernelpagesize_kB=4
7f4000000000 bind:1 file=/dev/hugepages/qemu_back_mem huge dirty=512 N1=512 kernelpagesize_kB=2048
7f5c2a600000 default file=/usr/lib/libc.so.6 mapped=40 mapmax=90 N0=40 kernelpagesize_kB=4
7ffd5f1e0000 default stack anon=9 dirty=9 N0=9 kernelpagesize_kB=4
7f6000000000 default
7f6100000000 default anon=3 N2=x N0=3 kernelpagesize_kB=4
"""


def test_numa_maps_weighs_each_mapping_by_its_page_size() -> None:
    kib = parse_numa_maps(NUMA_MAPS)
    assert kib == {0: 4 * (1200 + 2144 + 40 + 9 + 3), 1: 4 * 260000 + 2048 * 512}
    assert resident_node(kib) == 1


def test_resident_node_needs_more_than_half_of_the_memory() -> None:
    assert resident_node({}) is None
    assert resident_node({0: 0}) is None
    assert resident_node({0: 50, 1: 50}) is None  # interleaved: no node is nearer
    assert resident_node({0: 51, 1: 49}) == 0
    assert resident_node({3: 10}) == 3


def test_read_resident_from_the_pidfile_and_numa_maps(tmp_path: Path) -> None:
    run, proc = tmp_path / "run", tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    run.mkdir()
    (run / "vm.pid").write_text("4242\n")
    (proc / "4242" / "numa_maps").write_text(NUMA_MAPS)
    assert read_resident("vm", run, proc) == 1
    # Unreadable in any way (no pidfile, a bad one, the process gone): not known.
    assert read_resident("other", run, proc) is None
    (run / "bad.pid").write_text("not a pid")
    assert read_resident("bad", run, proc) is None
    (run / "gone.pid").write_text("999999")
    assert read_resident("gone", run, proc) is None
