"""AHCPTQ quantizers (SPEC section 7): level sets, searches, grouping, folding, states."""

from __future__ import annotations

import copy

import pytest
import torch

from leansam.errors import InputError
from leansam.quant import (
    HLUQ,
    CAGQuantizer,
    Log2Quantizer,
    QuantConfig,
    UniformQuantizer,
    round_ste,
    sign_fold,
    sqnr_db,
)


def _post_gelu(n: int = 4096, c: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.gelu(torch.randn(n, c, generator=g) * 2 + 0.3)


def _calibrated_hluq(bits: int, x: torch.Tensor, **kw) -> HLUQ:
    q = HLUQ(bits, **kw).observe()
    for chunk in x.split(1024):
        q(chunk)
    q.init_params()
    return q


@pytest.mark.parametrize("bits", [4, 5, 6])
@torch.no_grad()
def test_hluq_has_exactly_2_pow_b_levels(bits):
    x = _post_gelu()
    q = _calibrated_hluq(bits, x)
    assert q.levels().numel() == 2**bits
    dense = torch.linspace(float(x.min()) - 1, float(x.max()) + 5, 200_000)
    out = torch.unique(q(dense).detach())
    assert out.numel() == 2**bits
    torch.testing.assert_close(out, q.levels())
    # the quantized tensor takes only those values, and log levels halve below s_log
    m, s_log = float(q.minimum), float(q.s_log.detach())
    assert float(out[0]) == pytest.approx(m)  # x' -> 0
    logs = out[1 : q.levels_log + 1] - m
    torch.testing.assert_close(logs[1:] / logs[:-1], torch.full((q.levels_log - 1,), 2.0))
    assert float(logs[-1]) == pytest.approx(s_log)


@torch.no_grad()
def test_hluq_formula_by_hand():
    q = HLUQ(4)
    q.minimum.fill_(-0.2)
    q.s_log.data.fill_(1.0)
    q.s_uni.data.fill_(0.5)
    q.g.fill_(0.25)  # 4 log levels, 12 uniform levels
    q.initialized.fill_(True)
    m = -0.2
    cases = {
        1.0: 1.0,  # x' = s_log: log branch, k = 0
        0.3: 0.25,  # k = round(-log2 0.3) = 2
        0.1: 0.125,  # k = 3 (the last log level)
        0.05: 0.0,  # k = round(4.32) = 4 >= L_log: zero
        1.6: 1.5,  # uniform j = round(1.2) = 1
        100.0: 1.0 + 11 * 0.5,  # uniform clamped to L_uni - 1
    }
    xs = torch.tensor(list(cases)) + m
    expected = torch.tensor(list(cases.values())) + m
    torch.testing.assert_close(q(xs), expected)


@torch.no_grad()
def test_hluq_search_picks_the_mse_minimal_pair():
    x = _post_gelu(seed=1)
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(2)) / 8
    layer = lambda t: t @ w  # noqa: E731 - the next linear layer
    q = HLUQ(4).observe()
    q(x)
    r, g = q.init_params(layer, x)
    errors = {}
    for rr in HLUQ.r_grid:
        for gg in HLUQ.g_grid:
            s_log, s_uni = HLUQ.candidate(rr, gg, float(x.max() - x.min()), 4)
            t = HLUQ(4)
            t.minimum.fill_(float(x.min()))
            t.s_log.data.fill_(s_log)
            t.s_uni.data.fill_(s_uni)
            t.g.fill_(gg)
            t.initialized.fill_(True)
            with torch.no_grad():
                errors[(rr, gg)] = float((layer(t(x)) - layer(x)).pow(2).mean())
    assert (r, g) == min(errors, key=errors.get)
    assert len(set(errors.values())) > 1  # the search had something to choose


@torch.no_grad()
def test_hluq_kernel_bug_flag_reproduces_the_collapse():
    x = _post_gelu() * 4  # range well above L_log (4 at 4 bits, g = 1/4)
    right = _calibrated_hluq(4, x)
    buggy = copy.deepcopy(right)
    buggy.kernel_bug = True
    shifted = x - float(right.minimum)
    # the bug hits the uniform region (x' > s_log) where x' >= L_log
    high = (shifted > float(right.s_log.detach())) & (shifted >= right.levels_log)
    assert high.float().mean() > 0.01
    yb, yr = buggy(x).detach(), right(x).detach()
    collapsed = float((buggy.minimum + buggy.s_log).detach())
    assert torch.allclose(yb[high], torch.full_like(yb[high], collapsed))
    assert not torch.allclose(yr[high], torch.full_like(yr[high], collapsed))
    assert torch.equal(yb[~high], yr[~high])
    assert sqnr_db(x, yr) > sqnr_db(x, yb) + 10


@torch.no_grad()
def test_uniform_quantizer_inits():
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 40.0  # an outlier
    errs = {}
    for method in UniformQuantizer.methods:
        q = UniformQuantizer(4, method=method).observe()
        q(x)
        q.init_params()
        y = q(x)
        assert torch.unique(y).numel() <= 16
        errs[method] = float((y - x).pow(2).mean())
    assert errs["mse"] < errs["minmax"] and errs["percentile"] < errs["minmax"]
    # per-channel weights (axis 0): min and max land exactly on levels
    w = torch.randn(8, 32)
    qw = UniformQuantizer(8, channel_axis=0)
    qw.init_params(weight=w)
    assert qw.num_params() == 8
    yw = qw(w)
    half_step = qw.scale.detach() / 2 + 1e-6
    assert bool(((yw.amin(1) - w.amin(1)).abs() <= half_step).all())
    assert bool(((yw.amax(1) - w.amax(1)).abs() <= half_step).all())
    assert sqnr_db(w, yw) > 40
    with pytest.raises(InputError, match="unknown quantizer init"):
        UniformQuantizer(4, method="kl")


def test_states_observe_disabled_uncalibrated():
    q = UniformQuantizer(4)
    x = torch.randn(100)
    with pytest.raises(RuntimeError, match="before calibration"):
        q(x)
    q.observe()
    assert torch.equal(q(x), x)  # observing passes through
    q.init_params()
    assert not torch.equal(q(x), x)
    q.enabled = False
    assert torch.equal(q(x), x)
    with pytest.raises(InputError, match=r"bits must be 2\.\.16"):
        HLUQ(1)


def test_lsq_scale_gets_gradients():
    q = UniformQuantizer(4).observe()
    x = torch.randn(256)
    q(x)
    q.init_params()
    (q(x) - x).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0
    y = torch.tensor([0.4, 1.6], requires_grad=True)
    round_ste(y).sum().backward()
    assert torch.equal(y.grad, torch.ones(2))


@torch.no_grad()
def test_cag_progressive_grouping_to_four_groups():
    g = torch.Generator().manual_seed(0)
    c = 64
    # channels in four families of (min, max), as CAG expects of real activations
    lo = torch.tensor([-1.0, 0.0, -8.0, -2.0]).repeat_interleave(c // 4)
    hi = torch.tensor([1.0, 2.0, 0.0, 14.0]).repeat_interleave(c // 4)
    x = lo + (hi - lo) * torch.rand(4096, c, generator=g)
    q = CAGQuantizer(4, channel_axis=-1).observe()
    q(x)
    q.init_params()
    assert q.num_groups == c
    per_channel = q(x)
    for n in (32, 16, 8, 4):
        q.regroup(n)
        assert q.num_groups == n and int(q.group.max()) == n - 1
    assert q.num_params() == 4 and torch.equal(q.zero_point, q.zero_point.round())
    # channels of one original range end in one group
    for k in range(4):
        assert q.group[k * 16 : (k + 1) * 16].unique().numel() == 1
    grouped = q(x)
    assert sqnr_db(x, grouped) > sqnr_db(x, per_channel) - 3  # grouping costs little here
    # the forward uses the grouped parameters: changing one group's scale changes its channels
    members = q.group == q.group[0]
    before = q(x)
    with torch.no_grad():
        q.scale[q.group[0]] *= 2
    after = q(x)
    assert not torch.equal(after[:, members], before[:, members])
    assert torch.equal(after[:, ~members], before[:, ~members])
    # by hand, channel by channel
    s, z = q.channel_params()
    manual = (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s
    torch.testing.assert_close(after, manual)


@torch.no_grad()
def test_cag_merge_rules():
    """``range`` (default) covers every member's range; ``mean`` is the members' centroid."""
    g = torch.Generator().manual_seed(1)
    lo = -torch.rand(32, generator=g) * 4
    hi = torch.rand(32, generator=g) * 8 + 0.5
    x = lo + (hi - lo) * torch.rand(2048, 32, generator=g)
    x[0], x[1] = lo, hi  # every channel reaches its min and max
    qs = {}
    for merge in ("range", "mean"):
        q = CAGQuantizer(4, channel_axis=-1).observe()
        q(x)
        q.init_params()
        scale0, zp0 = (t.clone() for t in q.channel_params())
        q.regroup(4, merge=merge)
        qs[merge] = (q, scale0, zp0)
    q, scale0, _ = qs["range"]
    s = q.channel_params()[0]
    # nothing clipped: the group covers each member's grid, so a value is off by at most half
    # the group's step plus half the member's own step (both zero points are rounded)
    assert bool(((q(x) - x).abs() <= s / 2 + scale0 / 2 + 1e-5).all())
    assert s.unique().numel() == 4
    q, scale0, zp0 = qs["mean"]
    for k in range(4):
        m = q.group == k
        assert float(q.scale[k]) == pytest.approx(float(scale0[m].mean()), rel=1e-6)
        assert float(q.zero_point[k]) == float(zp0[m].mean().round())
    # the mean rule clips the wide channels of some group; the range rule does not
    assert float((q(x) - x).abs().max()) > float(qs["range"][0](x).sub(x).abs().max())
    with pytest.raises(InputError, match="cag_merge"):
        QuantConfig(cag_merge="median")
    assert QuantConfig().cag_merge == "range"
    assert QuantConfig.from_dict({"method": "minmax"}).cag_merge == "mean"  # files from before


@torch.no_grad()
def test_log2_quantizer_for_softmax():
    q = Log2Quantizer(4)
    q.init_params()
    p = torch.softmax(torch.randn(8, 100), -1)
    y = q(p)
    vals = torch.unique(y)
    assert vals.numel() <= 16 and float(vals.min()) >= 0
    nonzero = vals[vals > 0]
    assert torch.equal(torch.log2(nonzero), torch.log2(nonzero).round())  # powers of two
    assert float(q(torch.tensor([2.0**-20]))) == 0.0  # below the smallest level: zero
    assert float(q(torch.tensor([0.3]))) == 0.25


@torch.no_grad()
def test_log2_granularity_search_minimises_the_attention_output_error():
    torch.manual_seed(0)
    p = torch.softmax(2 * torch.randn(4, 48, 200), -1)
    v = torch.randn(4, 200, 16)
    q = Log2Quantizer(8)
    q.rows = 48  # every query row, so that the brute force below sees the same data
    q.observe()
    assert torch.equal(q(p, value=v), p)  # observing passes through
    q.init_params()

    def error(tau, s):
        return float(
            (Log2Quantizer._fake(p, torch.tensor(tau), torch.tensor(s), 8) @ v - p @ v)
            .pow(2)
            .mean()
        )

    grid = {(t, s): error(t, s) for t in Log2Quantizer.taus for s in Log2Quantizer.scales}
    best = min(grid, key=grid.get)
    assert (float(q.tau), float(q.scale)) == pytest.approx(best)
    assert float(q.tau) > 1  # 8 bits leave room for a finer grid than powers of two
    assert grid[best] < 0.1 * error(1, 1.0)  # far below plain log2's error
    y = q(p)
    k = -torch.log2(y[y > 0] / q.scale) * q.tau  # every output is s * 2^(-k / tau), k integer
    assert torch.allclose(k, k.round(), atol=1e-3)
    # without the search (or before calibration data) it is the plain log2 quantizer
    plain = Log2Quantizer(8, search=False).observe()
    plain(p, value=v)
    plain.init_params()
    assert (float(plain.tau), float(plain.scale)) == (1.0, 1.0)
    # a state dict written before the search existed loads as plain log2
    state = {k: t for k, t in q.state_dict().items() if k not in ("tau", "scale")}
    old = Log2Quantizer(8)
    old.tau.fill_(4)
    old.load_state_dict(state)
    assert float(old.tau) == 1.0 and float(old.scale) == 1.0


def test_sign_fold_keeps_attention_and_makes_keys_one_sided():
    torch.manual_seed(0)
    q_proj, k_proj = torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)
    x_q, x_k = torch.randn(10, 32), torch.randn(50, 32)
    scores = q_proj(x_q) @ k_proj(x_k).T
    signs = sign_fold(q_proj, k_proj, x_k)
    assert set(signs.tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(q_proj(x_q) @ k_proj(x_k).T, scores)
    assert bool((k_proj(x_k).mean(0) >= 0).all())


def _wq(linear):
    w = UniformQuantizer(4, channel_axis=0, symmetric=True)
    w.init_params(weight=linear.weight)
    return w


def test_integer_reference_equals_fake_quant_hluq():
    from leansam.quant.integer import IntegerLinearHLUQ, fake_quant_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = _post_gelu(512, 64)
    act = _calibrated_hluq(4, x)
    w = _wq(lin)
    with torch.no_grad():
        ref = fake_quant_linear(lin, w, act, x)
        out = IntegerLinearHLUQ(lin, w, act)(x)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    is_log, k, _ = IntegerLinearHLUQ(lin, w, act).encode(x)
    assert bool(is_log.any()) and bool((~is_log).any()) and bool((k >= act.levels_log).any())


def test_integer_reference_equals_fake_quant_cag():
    from leansam.quant.integer import IntegerLinearCAG, datapath_registers, fake_quant_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    lo = torch.linspace(-3, 0, 64)
    x = lo + (torch.linspace(1, 6, 64) - lo) * torch.rand(512, 64)
    act = CAGQuantizer(4).observe()
    act(x)
    act.init_params()
    for n in (32, 16, 8, 4):
        act.regroup(n)
    w = _wq(lin)
    with torch.no_grad():
        ref = fake_quant_linear(lin, w, act, x)
        out = IntegerLinearCAG(lin, w, act)(x)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    regs = datapath_registers(act, 64)
    assert regs["pairs"] == 4 and regs["reduction"] == pytest.approx(1 - 4 / 64)
