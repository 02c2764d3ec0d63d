from __future__ import annotations

import re

from vcpusched.logs import event, quote


def test_plain_values_are_bare() -> None:
    assert event("move", domain="web1", vcpu=0, load=42.04) == "move domain=web1 vcpu=0 load=42.0"


def test_hostile_domain_names_cannot_forge_fields_or_lines() -> None:
    for name in ["evil\nmove domain=x vcpu=0 from=0 to=1", "a b=c", 'q"uote', "tab\tx", "é"]:
        line = event("move", domain=name, vcpu=0)
        assert "\n" not in line
        assert "\t" not in line
        fields = re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)
        assert [k for k, _ in fields] == ["domain", "vcpu"]


def test_quote() -> None:
    assert quote("0-3,8") == "0-3,8"
    assert quote("") == '""'
    assert quote("a=b") == '"a=b"'
