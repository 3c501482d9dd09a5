"""Budgets and schedules: the published table, scaling, validation, serialisation."""

import pytest

from visiondrop_edge.errors import UserError
from visiondrop_edge.schedule import Schedule, max_budget, resolve_schedule

# The table for LLaVA-1.5 (32 layers): vision | after 8 | after 16 | after 24.
PUBLISHED = {
    32: "42+6,8:30+5,16:22+4,24:16+3",
    64: "84+12,8:60+10,16:44+8,24:32+6",
    128: "168+24,8:120+20,16:88+16,24:64+12",
    192: "252+36,8:180+30,16:132+24,24:96+18",
}


@pytest.mark.parametrize("budget", sorted(PUBLISHED))
def test_published_budgets_on_llava_7b(budget):
    schedule = Schedule.from_budget(budget, num_layers=32, num_patches=576)
    assert schedule.describe() == PUBLISHED[budget]
    assert schedule.average_tokens() == budget  # the paper's per-layer average, exactly


def test_paper_arithmetic_for_budget_32():
    # (48 + 35 + 26 + 19) * 8 / 32 = 32, from VISIONDROP.md
    schedule = Schedule.from_budget(32, 32, 576)
    assert schedule.tokens_per_layer() == [48] * 8 + [35] * 8 + [26] * 8 + [19] * 8


def test_stage_layers_scale_with_depth():
    assert [s.after_layer for s in Schedule.from_budget(64, 8, 576).llm_stages] == [2, 4, 6]
    assert [s.after_layer for s in Schedule.from_budget(64, 12, 576).llm_stages] == [3, 6, 9]
    assert Schedule.from_budget(64, 8, 576).layer_groups() == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_other_budgets_scale_and_report_their_average():
    schedule = Schedule.from_budget(48, 32, 576)
    assert schedule.describe() == "63+9,8:45+8,16:33+6,24:24+5"  # 1.5x the budget-32 shape, rounded half up
    assert schedule.average_tokens() == pytest.approx((72 + 53 + 39 + 29) / 4)


@pytest.mark.parametrize("text", ["full", "576", "FULL"])
def test_full_means_no_pruning(text):
    schedule = Schedule.from_budget(text, 32, 576)
    assert schedule.is_full and schedule.image_tokens == 576 and schedule.average_tokens() == 576


def test_explicit_schedule_round_trips():
    schedule = Schedule.parse("42+6,8:30+5,16:22+4,24:16+3", 32, 576)
    assert schedule == Schedule.from_budget(32, 32, 576)
    assert Schedule.from_dict(schedule.to_dict()) == schedule
    assert Schedule.parse("100+20", 32, 576).layer_groups() == [(0, 32)]  # vision-only pruning


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("42+6,8:50+5", "must not grow"),
        ("42+6,16:30+5,8:20+2", "strictly increase"),
        ("42+6,32:10+3", "layers run from 1 to 31"),
        ("42+6,0:10+3", "layers run from 1 to 31"),
        ("600+6", "at most 577"),
        ("42+0", "at least 1"),
        ("8:30+5", "malformed"),
        ("42-6", "malformed"),
    ],
)
def test_invalid_schedules_name_the_problem(text, fragment):
    with pytest.raises(UserError, match=fragment):
        Schedule.parse(text, 32, 576)


@pytest.mark.parametrize("budget", ["0", "-3", "600", "400", "lots"])
def test_invalid_budgets_name_the_valid_range(budget):
    with pytest.raises(UserError, match=r"between 1 and 385, or 'full' \(576\)"):
        Schedule.from_budget(budget, 32, 576)


def test_max_budget_is_the_last_that_fits():
    top = max_budget(32, 576)
    Schedule.from_budget(top, 32, 576)
    with pytest.raises(UserError):
        Schedule.from_budget(top + 1, 32, 576)


def test_budget_and_schedule_are_exclusive():
    with pytest.raises(UserError, match="not both"):
        resolve_schedule("64", "42+6", 32, 576)
    assert resolve_schedule(None, None, 32, 576).describe() == PUBLISHED[128]  # the default budget
