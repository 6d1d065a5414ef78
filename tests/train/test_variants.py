"""The variant syntax of ``maxscore compare`` and the paired-seed statistics."""

from __future__ import annotations

import math

import pytest
import torch

from maxscore.train.config import make_config
from maxscore.train.loop import initial_model
from maxscore.train.paired import paired_interval, paired_rows, paired_table, t_quantile
from maxscore.train.variants import parse_variant, parse_variants
from tests.conftest import TINY


def test_variant_settings_options_and_folder():
    v = parse_variant(
        "maxscore@two_stage:normalize=true:schedule.start=2:schedule.steps=10%:capacity_factor=1.25"
    )
    assert v.router == "maxscore"
    assert v.settings == {"capacity_factor": 1.25}
    assert v.options == {"method": "two_stage", "normalize": True, "schedule": {"start": 2, "steps": "10%"}}
    assert v.overrides(250)["router_options"]["schedule"] == {"start": 2, "steps": 25}
    assert (
        v.folder
        == "maxscore@two_stage+normalize=true+schedule.start=2+schedule.steps=10pct+capacity_factor=1.25"
    )
    assert parse_variant("switch").settings == {"k": 1}
    assert parse_variant("gshard:balance_coef=0").options == {"balance_coef": 0}
    assert [v.label for v in parse_variants("gshard, flow_only:normalize=true ,dense")] == [
        "gshard",
        "flow_only:normalize=true",
        "dense",
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("gshard,gshard", "more than once"),
        ("gshard:normalize", "is not KEY=VALUE"),
        ("gshard:1x=2", "is not KEY=VALUE"),
        ("@exact", "has no router name"),
        ("maxscore:schedule.steps=0%", r"must be a share in \(0%, 100%\]"),
        ("maxscore:seed=3", "seed cannot be set in a variant"),
        ("maxscore:schedule=1:schedule.start=2", "set both as a value and by field"),
        ("", "--routers is empty"),
    ],
)
def test_bad_variants_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        parse_variants(text)


def test_interval_matches_a_hand_computed_example():
    # differences 0.10, -0.02, 0.05: mean 0.043333, sd 0.060277, t(0.975, 2) = 4.302653,
    # half width 4.302653 * 0.060277 / sqrt(3) = 0.149737
    mean, low, high = paired_interval([0.10, -0.02, 0.05])
    assert mean == pytest.approx(0.0433333, abs=1e-6)
    assert low == pytest.approx(-0.1064034, abs=1e-6)
    assert high == pytest.approx(0.1930700, abs=1e-6)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047, abs=1e-6)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451, abs=1e-6)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert paired_interval([0.3])[1:] == (-math.inf, math.inf)


ROUTERS = ("maxscore", "flow_only", "gshard", "iterative", "dropless", "expert_choice", "softtopk_only")


def test_paired_runs_start_from_identical_weights():
    settings = {key: value for key, value in TINY.items() if key not in ("device",)}
    models = {
        router: initial_model(make_config("tiny", router=router, seed=4, **settings)).state_dict()
        for router in ROUTERS
    }
    reference = models["gshard"]
    for router, state in models.items():
        shared = [name for name in reference if name in state and state[name].dtype.is_floating_point]
        assert any(name.endswith("gate.weight") for name in shared)
        for name in shared:
            assert torch.equal(state[name], reference[name]), f"{router}: {name} differs"
    other_seed = initial_model(make_config("tiny", router="gshard", seed=5, **settings)).state_dict()
    assert not torch.equal(other_seed["embed.weight"], reference["embed.weight"])


def test_paired_rows_and_table_pair_by_seed():
    def run(seed, val, test):
        return {"seed": seed, "validation_batch": {"loss": val}, "test_batch": {"loss": test}}

    groups = {
        "base": [run(0, 5.0, 5.1), run(1, 5.2, 5.3), run(2, 4.9, 5.0)],
        "new": [run(0, 4.9, 5.0), run(1, 5.08, 5.2), run(2, 4.79, 4.9)],  # -0.10, -0.12, -0.11 per seed
        "once": [run(1, 5.1, 5.2)],
    }
    rows = {row["label"]: row for row in paired_rows(groups, "base")}
    assert rows["new"]["val_differences"] == pytest.approx([-0.10, -0.12, -0.11])
    expected = paired_interval(rows["new"]["val_differences"])
    got = (rows["new"]["val_diff"], rows["new"]["val_diff_low"], rows["new"]["val_diff_high"])
    assert got == expected
    high = expected[2]
    assert high < 0  # consistently better on every seed
    assert "val_diff" not in rows["base"]
    table = paired_table(list(rows.values()), "base")
    assert "| once | 1 |" in table and "-0.1000 (one seed: no interval)" in table
