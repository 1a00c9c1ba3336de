"""KahanSGD against a float64 NumPy reference of the documented algorithm and rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpcli.formats import FixedPoint, parse_format
from lpcli.optim import KahanSGD, compensation_format


def q_fixed(v: np.ndarray, fmt: FixedPoint) -> np.ndarray:
    """Nearest-even fixed point in float64 (np.round rounds half to even); one zero, +0."""
    scaled = np.round(v.astype(np.float64) * 2.0**fmt.frac)
    clipped = np.clip(scaled, -(2 ** (fmt.width - 1)), 2 ** (fmt.width - 1) - 1) + 0.0
    return (clipped / 2.0**fmt.frac).astype(np.float32)


def f32(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).astype(np.float32)


def reference_run(w0, grads, lr, momentum, decay, wf, cf, kahan):
    """Each operation in float64, rounded to float32 as the float32 implementation does."""
    w = q_fixed(w0, wf)
    c = np.zeros_like(w)
    buf = None
    for g in grads:
        d = g if decay == 0 else f32(g.astype(np.float64) + np.float64(np.float32(decay)) * w)
        if momentum:
            buf = d.copy() if buf is None else f32(f32(buf * np.float64(np.float32(momentum))) + d)
            d = buf
        u = f32(d.astype(np.float64) * np.float64(np.float32(-lr)))
        if kahan:
            y = f32(u.astype(np.float64) - c)
            t = q_fixed(f32(w.astype(np.float64) + y), wf)
            c = q_fixed(f32(f32(t.astype(np.float64) - w) - y), cf)
            w = t
        else:
            w = q_fixed(f32(w.astype(np.float64) + u), wf)
    return w, c


@pytest.mark.parametrize("kahan", [True, False])
@pytest.mark.parametrize("momentum,decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3)])
@pytest.mark.parametrize("fmt", ["fx8.7", "fx12.10", "fx6.3"])
def test_fixed_point_trajectory_matches_float64_reference(kahan, momentum, decay, fmt):
    rng = np.random.default_rng(7)
    w0 = rng.normal(0, 0.3, size=(64, 33)).astype(np.float32)
    grads = [rng.normal(0, 0.05, size=w0.shape).astype(np.float32) for _ in range(200)]
    wf = parse_format(fmt)
    lr = 0.01
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = KahanSGD([p], lr=lr, momentum=momentum, weight_decay=decay, weight_format=wf, kahan=kahan)
    for g in grads:
        p.grad = torch.from_numpy(g)
        opt.step()
    ref_w, ref_c = reference_run(w0, grads, lr, momentum, decay, wf, compensation_format(wf), kahan)
    assert np.array_equal(p.detach().numpy().view(np.int32), ref_w.view(np.int32))
    if kahan:
        assert np.array_equal(opt.state[p]["compensation"].numpy(), ref_c)


def test_compensation_format_covers_one_weight_lsb():
    wf = FixedPoint(8, 7)
    cf = compensation_format(wf)
    assert cf.width == wf.width
    assert cf.max_value < wf.step <= -cf.min_value
    assert compensation_format(parse_format("bf16")) == parse_format("bf16")


def test_small_updates_lost_by_plain_sgd_and_kept_by_kahan():
    wf = FixedPoint(8, 6)  # step 1/64; every update 1e-3 is below half a step
    grads = torch.full((100,), -0.1)
    results = {}
    for kahan in (False, True):
        p = torch.nn.Parameter(torch.zeros(100))
        opt = KahanSGD([p], lr=0.01, weight_format=wf, kahan=kahan)
        for _ in range(400):
            p.grad = grads.clone()
            opt.step()
        results[kahan] = (p.detach().clone(), opt.diagnostics()[0])
    plain_w, plain_d = results[False]
    kahan_w, kahan_d = results[True]
    assert torch.all(plain_w == 0)
    assert plain_d["lost_updates"] == 1.0 and plain_d["lost_mass"] == pytest.approx(1.0)
    # 400 updates of 1e-3 = 0.4: Kahan lands within one weight step of it.
    assert torch.all((kahan_w - 0.4).abs() <= wf.step)
    assert kahan_d["lost_mass"] < 0.05
    assert 0.9 < kahan_d["lost_updates"] < 1.0  # most single steps change nothing, yet nothing is lost


def test_fp32_format_matches_torch_sgd():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    ours = KahanSGD([a], lr=0.1, momentum=0.9, weight_decay=0.01, weight_format="fp32", kahan=False)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(20):
        g = torch.randn(50)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_weights_rounded_onto_format_at_start_and_saturation_counted():
    p = torch.nn.Parameter(torch.tensor([0.3, 5.0, -7.0, 0.01]))
    opt = KahanSGD([p], lr=0.1, weight_format="fx4.2")  # range [-2, 1.75], step 0.25
    assert p.detach().tolist() == [0.25, 1.75, -2.0, 0.0]
    assert opt.initial_saturated == 2


def test_rejects_bad_hyperparameters():
    p = torch.nn.Parameter(torch.zeros(2))
    for kwargs in ({"lr": 0.0}, {"lr": 0.1, "momentum": 1.0}, {"lr": 0.1, "weight_decay": -1.0}):
        with pytest.raises(ValueError):
            KahanSGD([p], **kwargs)
