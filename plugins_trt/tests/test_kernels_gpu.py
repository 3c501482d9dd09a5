"""The CUDA kernels against the PyTorch reference (visiondrop_edge.pruning.select / merge), on a GPU.

Indices must be identical (select's kept/rest indices, merge's member -> target assignment, on
data whose similarities have a clear margin) and select outputs bit-identical (pure gathers). Merge outputs may
differ only by the order of fp32 additions: within 1e-5 of the output's scale for fp32 and one
ulp of the output dtype at that scale (finfo.eps * scale) for fp16/bf16. Every output is
poisoned with NaN (indices with -7) first, and every op runs twice to prove bit-reproducibility.
"""

from __future__ import annotations

import pytest
import torch

from visiondrop_edge import pruning
from visiondrop_edge.pruning import Selection

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
METRIC_WIDTH = {577: 64, 576: 128, 2880: 80}  # 80: not a multiple of the 32-lane split


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    """The reference's fp32 matmuls must not use TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def poisoned_selection(b, n, k, d, m, dtype) -> Selection:
    nan = lambda *shape, dt=dtype: torch.full(shape, float("nan"), dtype=dt, device="cuda")  # noqa: E731
    index = lambda *shape: torch.full(shape, -7, dtype=torch.int32, device="cuda")  # noqa: E731
    return Selection(nan(b, k, d), nan(b, n - k, d), nan(b, n - k, m, dt=torch.float32), index(b, k), index(b, n - k))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def unique_scores(b: int, n: int, cls: bool = False) -> torch.Tensor:
    """Scores without exact ties (a permutation per row); CLS at index 0 scores +inf like stage 0."""
    scores = torch.stack([torch.randperm(n, device="cuda") for _ in range(b)]).float() / n
    if cls:
        scores[:, 0] = float("inf")
    return scores


def run_select(kernels, scores, tokens, metric, k) -> Selection:
    b, n, d = tokens.shape
    out = poisoned_selection(b, n, k, d, metric.shape[-1], tokens.dtype)
    return kernels.select(scores, tokens, metric, k, out=out)


def assert_select_matches(kernels, scores, tokens, metric, k):
    ref = pruning.select(scores, tokens, metric, k)
    first = run_select(kernels, scores, tokens, metric, k)
    second = run_select(kernels, scores, tokens, metric, k)
    assert first.kept_index.dtype == torch.int32 and first.rest_index.dtype == torch.int32
    assert torch.equal(first.kept_index.long(), ref.kept_index)
    assert torch.equal(first.rest_index.long(), ref.rest_index)
    for name in ("dominant", "rest_tokens", "rest_metric"):
        got, want = getattr(first, name), getattr(ref, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(bits(got), bits(want)), f"{name} differs from the reference gather"
    for name in ("dominant", "rest_tokens", "rest_metric", "kept_index", "rest_index"):
        assert torch.equal(bits(getattr(first, name)), bits(getattr(second, name))), f"{name} not reproducible"
    return first


def clustered_metric(b, r, m, c) -> torch.Tensor:
    """Raw merge metric whose rows sit near one target each, so the argmax has a clear margin
    (fp32 dot products summed in a different order cannot flip it); real keys cluster too."""
    targets = pruning.target_positions(r, c)
    base = torch.randn(b, r, m, device="cuda")
    pick = torch.randint(0, c, (b, r), device="cuda")
    metric = torch.gather(base[:, targets], 1, pick[..., None].expand(-1, -1, m)) * 3 + base
    metric[:, targets] = base[:, targets]  # the targets stay the cluster centres
    return metric


def assignment_margin(metric: torch.Tensor, c: int) -> float:
    """Smallest gap between the best and second-best target similarity over member rows."""
    r = metric.shape[1]
    if r == c or c < 2:
        return float("inf")
    members = pruning.member_positions(r, c, metric.device)
    normed = pruning.l2_normalize(metric.double())
    sim = normed.index_select(1, members) @ normed[:, pruning.target_positions(r, c)].transpose(1, 2)
    top = sim.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()


def merge_tolerance(ref: torch.Tensor) -> float:
    scale = ref.float().abs().max().item()
    return (1e-5 if ref.dtype == torch.float32 else torch.finfo(ref.dtype).eps) * scale


def assert_merge_matches(kernels, rest_tokens, rest_metric, c):
    ref = pruning.merge(rest_tokens, rest_metric, c)
    ref_assignment = ref.assignment  # each member's target: the reference's cosine argmax
    ref = ref.tokens
    b, r, d = rest_tokens.shape
    runs = []
    for _ in range(2):
        out = pruning.Merged(torch.full((b, c, d), float("nan"), dtype=rest_tokens.dtype, device="cuda"),
                             torch.full((b, r - c), -7, dtype=torch.int32, device="cuda"))
        merged = kernels.merge(rest_tokens, rest_metric, c, out=out)
        runs.append((merged.tokens, merged.assignment))
    got, assignment = runs[0]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert not torch.isnan(got).any(), "an output element was never written"
    error = (got.float() - ref.float()).abs().max().item()
    assert error <= merge_tolerance(ref), f"max abs error {error} > {merge_tolerance(ref)}"
    assert assignment.dtype == torch.int32 and assignment.shape == (b, r - c)
    assert torch.equal(assignment.long(), ref_assignment), "member -> target assignment differs from the reference"
    assert torch.equal(bits(runs[0][0]), bits(runs[1][0])), "merge is not bit-reproducible"
    assert torch.equal(runs[0][1], runs[1][1]), "assignment is not reproducible"
    return got, assignment


# ------------------------------------------------------------------ select

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("width", [1024, 4096])
@pytest.mark.parametrize("n", [577, 576, 2880])
@pytest.mark.parametrize("k_of", [42, 168, "half"])
def test_select_matches_reference(kernels, n, width, batch, dtype, k_of):
    torch.manual_seed(n + width + batch)
    k = n // 2 if k_of == "half" else k_of
    scores = unique_scores(batch, n, cls=n == 577)
    tokens = torch.randn(batch, n, width, device="cuda").to(dtype)
    metric = torch.randn(batch, n, METRIC_WIDTH[n], device="cuda")
    chosen = assert_select_matches(kernels, scores, tokens, metric, k)
    if n == 577:
        assert (chosen.kept_index[:, 0] == 0).all(), "the +inf CLS token must be kept"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_select_ties_go_to_the_lower_index(kernels, dtype):
    torch.manual_seed(1)
    b, n = 2, 577
    scores = torch.randint(-2, 3, (b, n), device="cuda").float()  # five values: ties everywhere
    scores[scores == 0] = -0.0
    scores[0, ::7] = 0.0  # +0.0 and -0.0 tie
    scores[1, [5, 300]] = float("inf")
    scores[0, 3] = float("-inf")
    tokens = torch.randn(b, n, 1024, device="cuda").to(dtype)
    metric = torch.randn(b, n, 64, device="cuda")
    for k in (1, 2, 42, 168, 400, n - 1, n):
        assert_select_matches(kernels, scores, tokens, metric, k)
    flat = torch.zeros(1, 50, device="cuda")
    tokens, metric = torch.randn(1, 50, 8, device="cuda").to(dtype), torch.randn(1, 50, 4, device="cuda")
    chosen = run_select(kernels, flat, tokens, metric, 7)
    assert chosen.kept_index.tolist() == [list(range(7))]


def test_select_keeps_every_inf_and_handles_k_equal_n(kernels):
    torch.manual_seed(2)
    b, n = 2, 576
    scores = unique_scores(b, n)
    scores[:, [0, 17, 575]] = float("inf")
    tokens = torch.randn(b, n, 4096, device="cuda", dtype=torch.float16)
    metric = torch.randn(b, n, 128, device="cuda")
    chosen = assert_select_matches(kernels, scores, tokens, metric, 3)
    assert chosen.kept_index.tolist() == [[0, 17, 575]] * b
    everything = assert_select_matches(kernels, scores, tokens, metric, n)
    assert everything.rest_tokens.shape == (b, 0, 4096) and everything.rest_index.shape == (b, 0)


def test_select_odd_sizes_and_largest_n(kernels):
    torch.manual_seed(3)
    # Row bytes not a multiple of 16 (2-byte copies), metric width 33, N = 1 and N = 4096.
    for b, n, d, m, k in [(2, 333, 1001, 33, 100), (1, 1, 7, 3, 1), (1, 4096, 1024, 256, 1000)]:
        for dtype in DTYPES:
            tokens = torch.randn(b, n, d, device="cuda").to(dtype)
            assert_select_matches(kernels, unique_scores(b, n), tokens, torch.randn(b, n, m, device="cuda"), k)


# ------------------------------------------------------------------ merge

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("width", [1024, 4096])
@pytest.mark.parametrize("n,k", [(577, 42), (576, 168), (2880, 1440)])
@pytest.mark.parametrize("c", [6, 24, 72])
def test_merge_matches_reference(kernels, n, k, width, batch, dtype, c):
    torch.manual_seed(n + c + width + batch)
    r = n - k
    c = min(c, r)
    rest_tokens = torch.randn(batch, r, width, device="cuda").to(dtype)
    metric = clustered_metric(batch, r, METRIC_WIDTH[n], c)
    assert assignment_margin(metric, c) > 1e-4, "test data too close to a tie for an fp32 comparison"
    assert_merge_matches(kernels, rest_tokens, metric, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_edge_cases(kernels, dtype):
    torch.manual_seed(4)
    cases = [
        (2, 10, 64, 4, 3),      # stride 3: targets 0, 3, 6; tail rows 7..9 are members
        (1, 24, 64, 8, 24),     # c == R: every row is a target, output == targets
        (1, 50, 16, 8, 1),      # one target takes everything
        (2, 333, 1001, 33, 40),  # odd widths: the scalar accumulate path
        (1, 4096, 1024, 256, 512),  # largest R and M: targets stream through shared memory in chunks
    ]
    for b, r, d, m, c in cases:
        rest = torch.randn(b, r, d, device="cuda").to(dtype)
        assert_merge_matches(kernels, rest, clustered_metric(b, r, m, c), c)
    same = torch.randn(1, 24, 64, device="cuda").to(dtype)
    merged = kernels.merge(same, torch.randn(1, 24, 8, device="cuda"), 24)
    assert torch.equal(merged.tokens, same) and merged.assignment.shape == (1, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_ties_go_to_the_first_target(kernels, dtype):
    torch.manual_seed(5)
    b, r, m, c = 2, 40, 16, 4  # stride 10: targets 0, 10, 20, 30
    metric = torch.randn(b, r, m, device="cuda")
    metric[:, 20] = metric[:, 10]  # identical targets: exact similarity ties, target 10 must win
    metric[:, 30] = metric[:, 10] * 2.0  # same direction, different norm
    rest = torch.randn(b, r, 256, device="cuda").to(dtype)
    got, assignment = assert_merge_matches(kernels, rest, metric, c)
    # Targets 20 and 30 can only have lost their members: they come out unchanged.
    assert torch.equal(bits(got[:, 2]), bits(rest[:, 20])) and torch.equal(bits(got[:, 3]), bits(rest[:, 30]))
    assert set(assignment.unique().tolist()) <= {0, 1}, "a tied member went to a later target"


def test_pipeline_select_then_merge(kernels):
    """select -> merge on the kernels equals pruning.prune's tokens (stage-0 shape, fp16)."""
    torch.manual_seed(6)
    b, n, d, m, k, c = 2, 577, 1024, 64, 42, 6
    scores = unique_scores(b, n, cls=True)
    tokens = torch.randn(b, n, d, device="cuda", dtype=torch.float16)
    metric = torch.randn(b, n, m, device="cuda")
    rest_index = pruning.select(scores, tokens, metric, k).rest_index  # put a clear-margin metric on the rest rows
    metric.scatter_(1, rest_index[..., None].expand(-1, -1, m), clustered_metric(b, n - k, m, c))
    chosen = kernels.select(scores, tokens, metric, k)
    merged = kernels.merge(chosen.rest_tokens, chosen.rest_metric, c)
    contextual = merged.tokens
    ref = pruning.prune(scores, tokens, metric, k, c)
    assert torch.equal(merged.assignment.long(), ref.assignment)
    assert torch.equal(bits(chosen.dominant), bits(ref.tokens[:, :k]))
    assert (contextual.float() - ref.tokens[:, k:].float()).abs().max().item() <= merge_tolerance(ref.tokens[:, k:])


def test_invalid_sizes_are_rejected(kernels):
    tokens = torch.randn(1, 8, 16, device="cuda")
    with pytest.raises(RuntimeError):
        kernels.merge(tokens, torch.randn(1, 8, 300, device="cuda"), 2)  # M > 256
    with pytest.raises(RuntimeError):
        kernels.select(torch.rand(1, 8, device="cuda"), tokens, torch.randn(1, 8, 4, device="cuda"), 0)  # k < 1
