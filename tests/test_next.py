"""LLaVA-NeXT (multi-crop "anyres" images): the budget rule (issue 15, decision 3)."""

from __future__ import annotations

import pytest

from visiondrop_edge.errors import UserError
from visiondrop_edge.schedule import CropGrid, Schedule


# ------------------------------------------------------------------ the budget rule (issue 15, decision 3)
def test_budget_320_on_a_2x2_grid_is_the_issue_schedule():
    schedule = Schedule.from_budget(320, 32, 576, grid=CropGrid(2, 2))
    assert (schedule.vision.dominant, schedule.vision.contextual) == (84, 12)  # the 1.5 schedule for 320 / 5 = 64
    assert schedule.image_tokens == 480
    assert [schedule.image_tokens] + [s.total for s in schedule.llm_stages] == [480, 350, 260, 190]
    assert schedule.average_tokens() == 320


@pytest.mark.parametrize("rows, cols", [(1, 2), (2, 1), (1, 3), (3, 1), (2, 2)])
@pytest.mark.parametrize("budget", [160, 320, 640])
def test_smaller_grids_get_proportionally_fewer_tokens(rows, cols, budget):
    """Every view gets LLaVA-1.5's schedule for B / 5; the LLM stages keep (M + 1) times its counts."""
    grid = CropGrid(rows, cols)
    schedule = Schedule.from_budget(budget, 32, 576, grid=grid)
    per_view = Schedule.from_budget(budget // 5, 32, 576)
    assert schedule.vision == per_view.vision
    assert [s.total for s in schedule.llm_stages] == [grid.views * s.total for s in per_view.llm_stages]
    assert schedule.average_tokens() == pytest.approx(budget * grid.views / 5)


def test_base_scope_reproduces_the_released_code_counts():
    """VISIONDROP_NEXT_REFERENCE.md section 4: the repo's flags on a 2x2 grid give 240, 227, 218
    and 211 visual tokens per layer group, an average of 224 (M = 2: 128, M = 3: 176)."""
    text = "42+6,8:30+5,16:22+4,24:16+3"
    schedule = Schedule.parse(text, 32, 576, grid=CropGrid(2, 2), scope="base")
    assert schedule.tokens_per_layer()[::8] == [240, 227, 218, 211]
    assert schedule.average_tokens() == 224
    assert Schedule.parse(text, 32, 576, grid=CropGrid(1, 2), scope="base").average_tokens() == 128
    assert Schedule.parse(text, 32, 576, grid=CropGrid(3, 1), scope="base").average_tokens() == 176


def test_explicit_per_view_schedules_and_serialisation():
    grid = CropGrid(2, 2)
    explicit = Schedule.parse("84+12,8:60+10,16:44+8,24:32+6", 32, 576, grid=grid)
    assert explicit == Schedule.from_budget(320, 32, 576, grid=grid)
    assert Schedule.from_dict(explicit.to_dict()) == explicit
    # a pruned schedule depends on the grid class only: the unpadded grid of the image is dropped
    assert Schedule.from_budget(320, 32, 576, grid=CropGrid(2, 2, (40, 48))) == explicit
    full = Schedule.from_budget("full", 32, 576, grid=CropGrid(2, 2, (40, 48)))
    assert Schedule.from_dict(full.to_dict()) == full and full.image_tokens == 576 + 40 * 49


@pytest.mark.parametrize("text, scope, fragment", [
    ("84+12,8:500+10", "block", "must not grow"),  # 2x2: 480 tokens enter the LLM
    ("84+12,8:97+1", "base", "must not grow"),  # base scope: the base view's 96
    ("84+12", "sideways", "scope 'sideways' is not one of block, base"),
])
def test_bad_multi_crop_schedules_are_refused(text, scope, fragment):
    with pytest.raises(UserError, match=fragment):
        Schedule.parse(text, 32, 576, grid=CropGrid(2, 2), scope=scope)
    with pytest.raises(UserError, match="needs its unpadded patch grid"):
        Schedule.full(32, 576, grid=CropGrid(2, 2))
