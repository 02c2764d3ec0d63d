"""The role's variables against the agent: same settings, same defaults, all documented.

Pure file checks (no container), so they also run with the unit tests.
"""

from __future__ import annotations

from typing import Any

import yaml

from tests.role.fixtures import config_document, role_defaults
from tests.role.playbook import ANSIBLE_DIR
from vcpusched import __version__
from vcpusched.config import Config, validate

ROLE = ANSIBLE_DIR / "roles/vcpusched"


def argument_options() -> dict[str, Any]:
    specs = yaml.safe_load((ROLE / "meta/argument_specs.yml").read_text())
    options: dict[str, Any] = specs["argument_specs"]["main"]["options"]
    return options


def test_role_defaults_are_the_agent_defaults() -> None:
    # Every key of the agent's config, and no other, with the agent's default value.
    assert config_document({}) == Config().as_document()
    assert validate(config_document({})) == Config()


def test_every_variable_is_documented_with_its_default() -> None:
    defaults, options = role_defaults(), argument_options()
    assert sorted(options) == sorted(defaults)
    for name, value in defaults.items():
        assert options[name].get("description"), name
        assert options[name].get("default") == value, name


def test_every_variable_carries_the_role_prefix() -> None:
    assert all(name.startswith("vcpusched_") for name in role_defaults())


def test_collection_version_is_the_agents() -> None:
    galaxy = yaml.safe_load((ANSIBLE_DIR / "collection/galaxy.yml").read_text())
    assert galaxy["version"] == __version__
    meta = yaml.safe_load((ROLE / "meta/main.yml").read_text())["galaxy_info"]
    assert galaxy["license"] == [meta["license"]]
