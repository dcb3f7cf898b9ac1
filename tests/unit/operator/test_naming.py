"""Child names are deterministic, unique and valid DNS labels, even for the longest job names."""

from __future__ import annotations

import re

from finetune.operator import naming

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_short_names_read_naturally() -> None:
    assert naming.trainer_name("sst2", 3) == "sst2-train-3"
    assert naming.server_name("sst2") == "sst2-server"
    assert naming.trainer_rbac_name("sst2") == "sst2-trainer"


def test_long_names_are_cut_with_a_hash() -> None:
    a, b = "a" * 62 + "b", "a" * 62 + "c"
    for name in (naming.trainer_name(a, 12), naming.server_name(a), naming.trainer_rbac_name(a)):
        assert DNS_LABEL.match(name) and len(name) <= 63
    assert len(naming.trainer_name(a, 1234)) <= naming.JOB_NAME_MAX
    assert naming.trainer_name(a, 1) != naming.trainer_name(b, 1)
    assert naming.trainer_name(a, 1) == naming.trainer_name(a, 1)
    assert naming.trainer_name(a, 1).endswith("-train-1")
