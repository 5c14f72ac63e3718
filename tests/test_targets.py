"""Targets: host patterns and limits resolved by Ansible's own inventory code."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import InventoryError
from engine.targets import resolve_targets, select_hosts

INI = """\
[fleet:children]
canary
main

[canary]
dev-a1 ansible_port=22222

[main]
dev-b1
dev-b2
edge[01:03].example

[lab]
dev-b2
lab-x

[fleet:vars]
ansible_user=root
engine_cli=balena
"""

YAML = """\
all:
  vars:
    ansible_python_interpreter: /nonexistent/python3
  children:
    fleet:
      children:
        canary:
          hosts:
            dev-a1:
              ansible_port: 22222
        main:
          hosts:
            dev-b1: {}
            dev-b2: {}
      vars:
        engine_cli: docker
    lab:
      hosts:
        dev-b2:
        lab-x:
"""


@pytest.fixture(params=["ini", "yaml"])
def inventory(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The same fleet as an INI and as a YAML inventory, with group_vars and host_vars dirs."""
    root = tmp_path / "inventory"
    (root / "group_vars").mkdir(parents=True)
    (root / "host_vars").mkdir()
    (root / "group_vars" / "canary.yml").write_text("probe_timeout: 5\n")
    (root / "host_vars" / "dev-b2.yml").write_text("engine_cli: balena-engine\nnote: '{{ 7*6 }}'\n")
    path = root / ("hosts.ini" if request.param == "ini" else "hosts.yml")
    path.write_text(INI if request.param == "ini" else YAML)
    return path


def names(inventory: Path, pattern: str, limit: str | None = None) -> list[str]:
    return list(resolve_targets(inventory, pattern, limit).names)


def test_group_vars_and_host_vars_are_merged(inventory: Path) -> None:
    """Host vars include inventory vars plus group_vars/ and host_vars/ files, host vars winning."""
    targets = resolve_targets(inventory, "dev-a1:dev-b2")
    by_name = {h.name: h.vars for h in targets.hosts}
    assert by_name["dev-a1"]["ansible_port"] == 22222
    assert by_name["dev-a1"]["probe_timeout"] == 5
    assert by_name["dev-b2"]["engine_cli"] == "balena-engine"
    assert "probe_timeout" not in by_name["dev-b2"]


def test_vars_are_not_templated(inventory: Path) -> None:
    """Inventory values are returned as written, like ansible-inventory --list shows them."""
    (host,) = resolve_targets(inventory, "dev-b2").hosts
    assert host.vars["note"] == "{{ 7*6 }}"


def test_group_vars_from_the_inventory_file(tmp_path: Path) -> None:
    """Group vars written in an INI inventory reach the hosts of child groups."""
    path = tmp_path / "hosts.ini"
    path.write_text(INI)
    (host,) = resolve_targets(path, "dev-a1").hosts
    assert host.vars["ansible_user"] == "root"
    assert host.vars["engine_cli"] == "balena"


def test_all_and_groups(inventory: Path) -> None:
    """``all`` and group names select hosts in Ansible's order."""
    assert set(names(inventory, "all")) >= {"dev-a1", "dev-b1", "dev-b2", "lab-x"}
    assert names(inventory, "canary") == ["dev-a1"]
    assert names(inventory, "fleet")[:3] == ["dev-a1", "dev-b1", "dev-b2"]


def test_union_exclusion_intersection_and_globs(inventory: Path) -> None:
    """``a:b``, ``!x``, ``&y``, globs and regexes behave as in ansible-playbook."""
    assert names(inventory, "canary:lab") == ["dev-a1", "dev-b2", "lab-x"]
    assert "dev-b2" not in names(inventory, "fleet:!lab")
    assert names(inventory, "fleet:&lab") == ["dev-b2"]
    assert names(inventory, "dev-b*") == ["dev-b1", "dev-b2"]
    assert names(inventory, "~dev-[ab]1") == ["dev-a1", "dev-b1"]


def test_ini_host_ranges_expand(tmp_path: Path) -> None:
    """INI host ranges become one host each."""
    path = tmp_path / "hosts.ini"
    path.write_text(INI)
    assert names(path, "edge*") == ["edge01.example", "edge02.example", "edge03.example"]


def test_limit_narrows_the_pattern(inventory: Path) -> None:
    """``--limit`` intersects with the runbook's pattern and is recorded on the target set."""
    targets = resolve_targets(inventory, "fleet", "lab:canary")
    assert targets.names == ("dev-a1", "dev-b2")
    assert targets.limit == "lab:canary"
    assert targets.pattern == "fleet"
    assert names(inventory, "fleet", "!dev-b*") == ["dev-a1"] + (
        ["edge01.example", "edge02.example", "edge03.example"] if inventory.suffix == ".ini" else []
    )


def test_limit_file(inventory: Path, tmp_path: Path) -> None:
    """A ``@file`` limit lists patterns one per line, as in ansible-playbook."""
    limit = tmp_path / "limit.txt"
    limit.write_text("dev-b1\nlab-x\n")
    assert set(names(inventory, "all", f"@{limit}")) == {"dev-b1", "lab-x"}


def test_empty_selection_names_inventory_and_pattern(inventory: Path) -> None:
    """A pattern (or limit) selecting nothing is an InventoryError naming both."""
    with pytest.raises(InventoryError, match=r"host pattern 'nosuch' selects no host") as exc:
        resolve_targets(inventory, "nosuch")
    assert str(inventory) in str(exc.value)
    with pytest.raises(InventoryError, match=r"'canary' with --limit 'lab' selects no host"):
        resolve_targets(inventory, "canary", "lab")


def test_implicit_localhost_is_not_a_target(inventory: Path) -> None:
    """``localhost`` absent from the inventory selects nothing instead of the controller."""
    with pytest.raises(InventoryError, match="selects no host"):
        resolve_targets(inventory, "localhost")


def test_missing_inventory(tmp_path: Path) -> None:
    """A missing inventory file is an InventoryError naming it."""
    missing = tmp_path / "nope.ini"
    with pytest.raises(InventoryError, match=r"nope\.ini: no such file"):
        resolve_targets(missing, "all")


def test_unparsable_inventory(tmp_path: Path) -> None:
    """An inventory no Ansible plugin can parse is an InventoryError, not an empty fleet."""
    bad = tmp_path / "bad.yml"
    bad.write_text("all: [unclosed\n")
    with pytest.raises(InventoryError, match=r"bad\.yml: .*[Ff]ailed to parse"):
        resolve_targets(bad, "all")


def test_missing_limit_file(inventory: Path, tmp_path: Path) -> None:
    """A ``@file`` limit that does not exist is reported by Ansible's message."""
    with pytest.raises(InventoryError, match="Unable to find limit file"):
        resolve_targets(inventory, "all", f"@{tmp_path / 'none.txt'}")


def test_thousand_hosts_in_one_parse(tmp_path: Path) -> None:
    """A 1,000-host inventory resolves in one call with every host's vars."""
    path = tmp_path / "big.ini"
    rows = [f"dev{i:04d} ansible_host=10.0.{i // 256}.{i % 256}" for i in range(1000)]
    path.write_text("[fleet]\n" + "\n".join(rows) + "\n[fleet:vars]\nansible_connection=local\n")
    targets = resolve_targets(path, "fleet", "!dev000*")
    assert len(targets.hosts) == 990
    assert targets.hosts[0].vars == {"ansible_connection": "local", "ansible_host": "10.0.0.10"}


def test_select_hosts_may_select_nothing(inventory: Path) -> None:
    """``select_hosts`` answers an empty selection with no hosts; resolve_targets refuses it."""
    assert select_hosts(inventory, "nosuch") == ()
    assert [h.name for h in select_hosts(inventory, "canary", "!dev-a1")] == []
    assert [h.name for h in select_hosts(inventory, "canary")] == ["dev-a1"]
