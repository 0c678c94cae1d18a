"""Playbooks: the samples load, bad ones fail with every problem at file:line, selectors select."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from migrate.errors import ConfigError
from migrate.playbook import NetworkRef, Playbook, Selector, load_playbook, unknown_vms
from planner_builders import lab_vms, nic, source, vm

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "playbooks").glob("*.yaml"))

MINIMAL = """\
name: t
select:
  include: [{names: ["*"]}]
targets: {default: lab-pve}
"""


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "pb.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_playbook(path)
    for p in info.value.problems:
        assert p.file == str(path)
    return sorted(
        (f"{p.line} {p.path}: {p.message}" for p in info.value.problems), key=lambda s: int(s.split()[0])
    )


def test_there_are_three_samples() -> None:
    """The three documented sample playbooks ship with the repository."""
    assert [p.name for p in SAMPLES] == ["linux-to-proxmox.yaml", "mixed-waves.yaml", "windows-safe.yaml"]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_samples_load(path: Path) -> None:
    """Each sample validates and records its file and the sha256 of its bytes."""
    pb = load_playbook(path)
    assert pb.file == str(path)
    assert pb.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert pb.waves and pb.targets.default


def test_minimal_playbook_gets_defaults(tmp_path: Path) -> None:
    """Unset options take the documented defaults (keep MAC, guest shutdown, safe Windows, ...)."""
    path = tmp_path / "pb.yaml"
    path.write_text(MINIMAL)
    pb = load_playbook(path)
    o = pb.options
    assert (o.keep_mac, o.shutdown, o.start_after, o.verify, o.windows_first_boot) == (
        True,
        "guest",
        True,
        "running",
        "safe",
    )
    assert (o.storage_headroom_percent, o.overcommit.cpu, o.overcommit.memory) == (10, 4.0, 1.0)
    assert [(w.name, w.concurrency, w.select) for w in pb.waves] == [("all", 2, [])]
    assert (pb.vmid.start, pb.naming.template) == (100, "{name}")


MALFORMED = [
    pytest.param(
        "name: t\nselect:\n  include:\n    - {}\n    - names: web-*\n      colour: blue\n"
        "targets: {default: x}\n",
        [
            "4 $.select.include[0]: an empty selector would match every VM; write names: ['*'] if that is "
            "meant",
            "6 $.select.include[1].colour: unknown field; check its spelling against examples/ and the "
            "README",
        ],
        id="selectors",
    ),
    pytest.param(
        MINIMAL + "waves:\n  - name: one\n    concurrency: two\n  - name: b@d\n",
        [
            "7 $.waves[0].concurrency: Input should be a valid integer, unable to parse string as an integer "
            "(got 'two')",
            "8 $.waves[1].name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]*$' (got 'b@d')",
        ],
        id="waves-fields",
    ),
    pytest.param(
        MINIMAL + "waves:\n  - name: a\n  - name: a\n    select: {vms: [x]}\n",
        ["5 $.waves: waves[1] repeats the name 'a' of waves[0]; wave names must be unique"],
        id="waves-duplicate",
    ),
    pytest.param(
        MINIMAL + "waves:\n  - name: a\n  - name: b\n    select: {vms: [x]}\n",
        [
            "5 $.waves: waves[0] has no select, so it takes every VM and the waves after it stay empty; "
            "give it a select or move it last"
        ],
        id="waves-catch-all-first",
    ),
    pytest.param(
        MINIMAL + "network_map:\n  lab-pve:\n    VM Network: vmbr0/5000\nstorage_map:\n  lab-pve:\n"
        "    LocalDS_0: []\n",
        [
            "7 $.network_map.lab-pve.VM Network.vlan: Input should be less than or equal to 4094 (got 5000)",
            "10 $.storage_map.lab-pve.LocalDS_0: Value should have at least 1 item after validation, not 0",
        ],
        id="maps",
    ),
    pytest.param(
        MINIMAL + 'vmid: {start: 500, end: 400}\nnaming: {template: "{nme}"}\n',
        [
            "5 $.vmid: end (400) is below start (500)",
            "6 $.naming.template: unknown placeholder {nme}; use {name}, {moref}, {datacenter}, {cluster}",
        ],
        id="vmid-naming",
    ),
    pytest.param(
        MINIMAL + "vmid: {start: 50}\nnaming: {template: fixed}\n",
        [
            "5 $.vmid.start: Input should be greater than or equal to 100 (got 50)",
            "6 $.naming.template: the template has no placeholder, so every VM would get the same name; "
            "include {name} or {moref}",
        ],
        id="vmid-low-fixed-name",
    ),
    pytest.param(
        MINIMAL + "options:\n  shutdown: maybe\n  overcommit: {cpu: 0}\n  node_overcommit: {pve1: {cpu: 2}}\n"
        "  disk_format: {proxmox: {dir: vhd}}\n",
        [
            "6 $.options.shutdown: Input should be 'never', 'guest' or 'require-off' (got 'maybe')",
            "7 $.options.overcommit.cpu: Input should be greater than 0 (got 0)",
            "8 $.options.node_overcommit.pve1.[key]: write the node as target/node, e.g. lab-pve/pve1 "
            "(got 'pve1')",
            "9 $.options.disk_format.proxmox.dir: Input should be 'raw' or 'qcow2' (got 'vhd')",
        ],
        id="options",
    ),
    pytest.param(
        MINIMAL + "options:\n  verify: boot\n  start_after: false\n",
        ["5 $.options: verify: boot needs the VM to run; set start_after: true or verify: none"],
        id="verify-needs-start",
    ),
    pytest.param(
        "name: t\nselect: {include: []}\ntargets: {}\nversion: 2\nsurprise: 1\n",
        [
            "2 $.select.include: List should have at least 1 item after validation, not 0",
            "3 $.targets: give at least one rule or a default target",
            "4 $.version: Input should be 1 (got 2)",
            "5 $.surprise: unknown field; check its spelling against examples/ and the README",
        ],
        id="top-level",
    ),
    pytest.param(
        "name: t\nselect:\n  include: [{names: ['*']}]\n",
        ["1 $.targets: required field is missing"],
        id="missing-targets",
    ),
    pytest.param(
        "name: t\nselect:\n  include: [{names: ['*']}]\n  include: [{vms: [a]}]\ntargets: {default: x}\n",
        ["4 $.select.include: duplicate key; YAML would silently keep only the last one, remove one of them"],
        id="duplicate-key",
    ),
    pytest.param(
        "name: t\nselect: [unclosed\n",
        ["3 $: not valid YAML: expected ',' or ']', but got '<stream end>'; check indentation and quoting"],
        id="not-yaml",
    ),
]


@pytest.mark.parametrize(("text", "expected"), MALFORMED)
def test_malformed_playbooks_report_every_problem_with_its_line(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    """A bad playbook fails with all its problems at once, each as file:line $.path: message."""
    assert _problems(tmp_path, text) == expected


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    """A playbook path that does not exist is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=r"nope\.yaml \$: file not found"):
        load_playbook(tmp_path / "nope.yaml")


def _sel(**kw: Any) -> Selector:
    return Selector.model_validate(kw)


WEB, WIN, DB, APP, TMPL = lab_vms()


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ({"names": "web-*"}, {"web-01"}),
        ({"names": ["WEB-*", "app-0?"]}, {"web-01", "app-02"}),
        ({"vms": ["vm-102", "app-02"]}, {"win-app-01", "app-02"}),
        ({"os": "windows"}, {"win-app-01"}),
        ({"os": ["linux"], "power_state": "poweredOn"}, {"app-02"}),
        ({"guest_ids": ["debian*"]}, {"Žluťoučký kůň / db"}),
        ({"names": ["*kůň*"]}, {"Žluťoučký kůň / db"}),
        (
            {"folders": ["DC0/*"], "clusters": "DC0_C0", "datacenters": "DC0", "hosts": "DC0_C0_H*"},
            {"web-01", "win-app-01", "Žluťoučký kůň / db", "app-02", "tmpl-rhel9"},
        ),
        ({"folders": ["*/prod"]}, set()),
        ({"attributes": {"owner": "team-*"}}, {"web-01"}),
        ({"attributes": {"owner": "team-*", "tier": "gold"}}, set()),
    ],
)
def test_selectors(selector: dict[str, Any], matches: set[str]) -> None:
    """Every given field must match; list fields match when any glob does (case-insensitive)."""
    vms = [replace(WEB, custom_attributes=(("owner", "team-web"),)), WIN, DB, APP, TMPL]
    sel = _sel(**selector)
    assert {v.name for v in vms if sel.matches(v)} == matches


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("vmbr0", NetworkRef(name="vmbr0")),
        ("vmbr1/20", NetworkRef(name="vmbr1", vlan=20)),
        ({"bridge": "vmbr1", "vlan": 30}, NetworkRef(name="vmbr1", vlan=30)),
        ("Pool-wide network associated with eth0", NetworkRef(name="Pool-wide network associated with eth0")),
        ("net/dmz", NetworkRef(name="net/dmz")),
        ({"network": "odd/42"}, NetworkRef(name="odd/42")),
    ],
)
def test_network_map_values(value: Any, expected: NetworkRef) -> None:
    """Network map values: bridge, bridge/VLAN, or a name (dict form when it ends in /digits)."""
    pb = Playbook.model_validate(
        {
            "name": "t",
            "select": {"include": [{"names": ["*"]}]},
            "targets": {"default": "x"},
            "network_map": {"x": {"pg": value}},
        }
    )
    assert pb.network_map["x"]["pg"] == expected


def test_node_overcommit_overrides_per_node() -> None:
    """A node listed under node_overcommit gets its own ratios; others keep the playbook's."""
    pb = Playbook.model_validate(
        {
            "name": "t",
            "select": {"include": [{"names": ["*"]}]},
            "targets": {"default": "x"},
            "options": {
                "overcommit": {"cpu": 3, "memory": 1.1},
                "node_overcommit": {"x/n1": {"memory": 1.5}},
            },
        }
    )
    assert pb.options.ratios("x", "n1") == (3.0, 1.5)
    assert pb.options.ratios("x", "n2") == (3.0, 1.1)
    assert pb.options.ratios("y", "n1") == (3.0, 1.1)


def test_naming_template_renders_placeholders() -> None:
    """The naming template fills name, moref, datacenter and cluster from the source VM."""
    pb = Playbook.model_validate(
        {
            "name": "t",
            "select": {"include": [{"names": ["*"]}]},
            "targets": {"default": "x"},
            "naming": {"template": "{datacenter}-{cluster}-{name}-{moref}"},
        }
    )
    v = vm("web", "vm-7", nics=(nic(),))
    assert pb.naming.render(v) == "DC0-DC0_C0-web-vm-7"


def test_vm_names_the_source_lacks_are_errors_with_lines(tmp_path: Path) -> None:
    """A playbook naming a VM the source does not have fails at that name's line (a typo moves nothing)."""
    path = tmp_path / "typo.yaml"
    path.write_text(
        "version: 1\nname: t\nselect:\n  include:\n    - vms: [web-01, web-99]\n"
        "targets:\n  default: lab-pve\nvmid:\n  fixed: {ghost: 150, web-01: 151}\n"
    )
    problems = unknown_vms(load_playbook(path), source(*lab_vms()))
    expected = [(5, "$.select.include[0].vms[1]"), (9, "$.vmid.fixed.ghost")]
    assert [(p.line, p.path) for p in problems] == expected
    assert all("no VM" in p.message and p.file == str(path) for p in problems)
