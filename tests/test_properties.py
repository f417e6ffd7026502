"""Property tests (hypothesis) over random shapes, groupings, per-group scales and dtypes.

The loss depends on the invariant weight only through its unit groups (exactly scale-invariant
per group, as a weight before a normalisation layer), plus a plain quadratic in a bias.  The
examples are derandomized (a fixed set per test, so CI is reproducible); run with
``HYPOTHESIS_PROFILE=explore`` to draw new ones.
"""

from __future__ import annotations

import copy
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import psiopt
from psiopt.optim.geometry import RowLayout, rows

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

PSI = ["psi-sgd", "psi-sgdm"]  # Arora's PSGD keeps each norm: its effective lr depends on it
SPHERE = ["un-sgd", "sgdg", "adamg", "adamg-star"]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


class Toy(nn.Module):
    """Parameters drawn from ``seed``; the loss's targets ``a``, ``c`` from the shape alone."""

    def __init__(self, shape, dtype, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        self.w2 = nn.Parameter(torch.randn(3, 2, generator=gen, dtype=dtype))  # channel, always
        self.b = nn.Parameter(torch.randn(3, generator=gen, dtype=dtype))
        gen.manual_seed(0)
        self.a = torch.randn(shape, generator=gen, dtype=dtype)
        self.c = torch.randn(3, 2, generator=gen, dtype=dtype)


@st.composite
def cases(draw, dtypes=(torch.float64, torch.float32)):
    """``(shape, grouping, log10 scale per group, dtype, seed)``."""
    channels = draw(st.integers(1, 6))
    shape = (channels, *draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    divisors = [g for g in range(2, channels + 1) if channels % g == 0]
    grouping = draw(st.sampled_from(["channel", "tensor", "channel@1", "tensor@1",
                                     *(f"groups:{g}" for g in divisors)]))
    n_groups = rows(torch.empty(shape), grouping).shape[0]
    scales = draw(st.lists(st.floats(-3, 3), min_size=n_groups, max_size=n_groups))
    return shape, grouping, scales, draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**16))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))


def loss(model: Toy, grouping: str) -> torch.Tensor:
    """Invariant in every group of ``w`` (grouping) and every row of ``w2``."""
    u, u2 = unit(rows(model.w, grouping)), unit(model.w2)
    return ((u * rows(model.a, grouping)).sum() + u.pow(3).sum() + (u2 * model.c).sum()
            + (u2.pow(2) * model.b[:, None]).sum() + (model.b - 0.5).square().sum())


def setup(case, name, scale=True, **hyper):
    shape, grouping, scales, dtype, seed = case
    model = Toy(shape, dtype, seed)
    with torch.no_grad():
        v = rows(model.w, grouping)
        v.copy_(unit(v))
        if scale:
            v.mul_((10.0 ** torch.tensor(scales, dtype=torch.float64)).to(dtype)
                   .view(-1, *[1] * (v.dim() - 1)))
    mapping = {"w": grouping, "w2": "channel"}
    return model, psiopt.create_optimizer(model, name, mapping=mapping, **hyper)


def steps(model, opt, grouping, n):
    for _ in range(n):
        opt.zero_grad()
        loss(model, grouping).backward()
        opt.step()


def group_norms(model, grouping):
    return rows(model.w, grouping).detach().flatten(1).norm(dim=1)


@given(cases())
def test_layout_reductions_are_the_per_group_norms_and_inner_products(case):
    """Every grouping, both dtypes, next to a "channel" weight: the layout's per-group norms,
    inner products and stacked sums (one-group tensors take BLAS's dot) equal plain torch's."""
    shape, grouping, scales, dtype, seed = case
    model, other = Toy(shape, dtype, seed), Toy(shape, dtype, seed + 1)
    xs = [rows(model.w.detach(), grouping), model.w2.detach()]
    ys = [rows(other.w.detach(), grouping), other.w2.detach()]
    layout = RowLayout(xs)
    want_n = torch.cat([x.flatten(1).norm(dim=1) for x in xs])
    want_d = torch.cat([(x * y).flatten(1).sum(1) for x, y in zip(xs, ys)])
    tol = dict(rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(layout.norms(xs), want_n, **tol)
    torch.testing.assert_close(layout.dots(xs, ys), want_d, **tol)
    sums = layout.sums([(xs, xs), (xs, ys), (ys, ys)])
    torch.testing.assert_close(sums[0], want_n.square(), **tol)
    torch.testing.assert_close(sums[1], want_d, **tol)
    torch.testing.assert_close(sums[2], torch.cat([y.flatten(1).norm(dim=1) for y in ys]).square(),
                               **tol)


@given(cases(), st.sampled_from(PSI), st.floats(1e-3, 0.3), st.booleans())
def test_psi_methods_are_equivariant_under_per_group_rescaling(case, name, lr, fixed_norm):
    """Yi Theorem 1: from w and from w with every group rescaled, the trajectories stay rescaled
    copies (up to the per-group rescale, the same network at every step)."""
    hyper = {"lr": lr, "fixed_norm": fixed_norm}
    a, opt_a = setup(case, name, scale=False, **hyper)
    b, opt_b = setup(case, name, **hyper)
    grouping = case[1]
    factors = (group_norms(b, grouping) / group_norms(a, grouping)).view(
        -1, *[1] * (rows(a.w, grouping).dim() - 1))
    steps(a, opt_a, grouping, 5)
    steps(b, opt_b, grouping, 5)
    wa, wb = rows(a.w, grouping).detach(), rows(b.w, grouping).detach()
    err = ((wb / factors - wa).flatten(1).norm(dim=1) / wa.flatten(1).norm(dim=1)).max()
    assert err <= TOL[case[3]], (name, case, float(err))
    assert torch.allclose(a.b, b.b, rtol=TOL[case[3]], atol=TOL[case[3]])


@given(cases(), st.sampled_from(SPHERE), st.integers(1, 5))  # rows prepared at the first step
def test_sphere_methods_keep_every_group_on_the_unit_sphere(case, name, n):
    model, opt = setup(case, name)
    steps(model, opt, case[1], n)
    err = (group_norms(model, case[1]) - 1).abs().max()
    assert err <= (1e-12 if case[3] == torch.float64 else 1e-5), (name, case, n, float(err))


@given(cases(dtypes=(torch.float64,)), st.sampled_from(psiopt.list_optimizers()))
def test_reference_and_vectorized_paths_agree(case, name):
    a, opt_a = setup(case, name, foreach=False)
    b, opt_b = setup(case, name, foreach=True)
    steps(a, opt_a, case[1], 4)
    steps(b, opt_b, case[1], 4)
    for (pname, p), q in zip(a.named_parameters(), b.parameters()):
        err = ((p - q).abs().max() / p.abs().max().clamp_min(1e-300)).item()
        assert err <= 1e-12, (name, case, pname, err)


@given(cases(), st.sampled_from(psiopt.list_optimizers()), st.integers(1, 3))
def test_state_dict_round_trip_continues_bit_identically(case, name, before):
    model, opt = setup(case, name)
    steps(model, opt, case[1], before)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    other, other_opt = setup((*case[:4], case[4] + 1), name)  # other weights, then loaded
    other.load_state_dict(saved_model)
    other_opt.load_state_dict(saved_opt)
    steps(model, opt, case[1], 3)
    steps(other, other_opt, case[1], 3)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q), (name, case)
