"""The pure losses against straightforward reference computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgedistill.losses import (
    embedding_distance,
    info_nce,
    mutual_kl,
    nt_xent,
    seed_loss,
    view_similarity_log_probs,
)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def test_info_nce_matches_loop():
    q, k, queue, t = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(7, 8, seed=3), 0.2
    total = 0.0
    for i in range(5):
        logits = [float(q[i] @ k[i]) / t] + [float(q[i] @ queue[j]) / t for j in range(7)]
        total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert info_nce(q, k, queue, t).item() == pytest.approx(total / 5, rel=1e-5)


def test_embedding_distance_is_mean_of_2_minus_2cos():
    s, t = unit(6, 16, seed=4), unit(6, 16, seed=5)
    expected = sum(2 - 2 * float(F.cosine_similarity(s[i], t[i], dim=0)) for i in range(6)) / 6
    assert embedding_distance(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert embedding_distance(s, s).item() == pytest.approx(0.0, abs=1e-6)


def _seed_reference(s, t, queue, tt, ts):
    total = 0.0
    for i in range(s.shape[0]):
        bank = [t[i]] + [queue[j] for j in range(queue.shape[0])]
        tl = [float(t[i] @ b) / tt for b in bank]
        sl = [float(s[i] @ b) / ts for b in bank]
        tm, sm = max(tl), max(sl)
        tz = sum(math.exp(v - tm) for v in tl)
        sz = sum(math.exp(v - sm) for v in sl)
        target = [math.exp(v - tm) / tz for v in tl]
        log_pred = [v - sm - math.log(sz) for v in sl]
        total += -sum(p * lp for p, lp in zip(target, log_pred))
    return total / s.shape[0]


@pytest.mark.parametrize("tt", [1e-4, 0.5])
def test_seed_loss_matches_handwritten_softmax(tt):
    s, t, queue = unit(4, 8, seed=6), unit(4, 8, seed=7), unit(9, 8, seed=8)
    expected = _seed_reference(s.double(), t.double(), queue.double(), tt, 0.2)
    assert seed_loss(s, t, queue, tt, 0.2).item() == pytest.approx(expected, rel=1e-4)


def test_seed_loss_sharp_target_is_infonce_with_teacher_as_positive():
    # With T_t = 1e-4 the target is one-hot on the teacher itself (t.t = 1 > t.Q): SEED reduces to
    # InfoNCE of the student against the teacher embedding, with the queue as negatives.
    s, t, queue = unit(4, 8, seed=9), unit(4, 8, seed=10), unit(9, 8, seed=11)
    assert seed_loss(s, t, queue).item() == pytest.approx(info_nce(s, t, queue, 0.2).item(), rel=1e-5)


def test_seed_loss_gradient_reaches_only_the_student():
    s = unit(4, 8, seed=12).requires_grad_(True)
    t = unit(4, 8, seed=13).requires_grad_(True)
    queue = unit(16, 8, seed=14).requires_grad_(True)
    seed_loss(s, t, queue, 0.5, 0.2).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and queue.grad is None


def test_seed_loss_memory_is_linear_in_queue():
    # A [N, K, D] bank would be 256 * 65536 * 128 floats (8.6 GB); the loss must not build one.
    s, t = unit(256, 128, seed=15), unit(256, 128, seed=16)
    queue = unit(65536, 128, seed=17)
    assert torch.isfinite(seed_loss(s, t, queue))


def test_nt_xent_matches_loop():
    n, tau = 4, 0.5
    z1, z2 = unit(n, 8, seed=18), unit(n, 8, seed=19)
    z = torch.cat([z1, z2]).double()
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(2 * n) if j != i)
        total += -(float(z[i] @ z[pos]) / tau - math.log(denom))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_nt_xent_gradient_is_finite():
    z1, z2 = unit(4, 8, seed=20).requires_grad_(True), unit(4, 8, seed=21).requires_grad_(True)
    nt_xent(z1, z2).backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_view_similarity_rows_are_distributions():
    a, b = unit(5, 8, seed=22), unit(5, 8, seed=23)
    logp = view_similarity_log_probs(a, b, 0.1)
    assert logp.shape == (5, 5)
    assert torch.allclose(logp.exp().sum(1), torch.ones(5), atol=1e-5)
    manual = torch.stack([F.log_softmax(torch.stack([a[i] @ b[j] for j in range(5)]) / 0.1, 0) for i in range(5)])
    assert torch.allclose(logp, manual, atol=1e-5)


def test_mutual_kl_zero_for_identical_peers_positive_otherwise():
    a, b = unit(6, 8, seed=24), unit(6, 8, seed=25)
    same = view_similarity_log_probs(a, b)
    assert mutual_kl(same, same.clone()).item() == pytest.approx(0.0, abs=1e-7)
    other = view_similarity_log_probs(unit(6, 8, seed=26), unit(6, 8, seed=27))
    kl = mutual_kl(same, other).item()
    assert kl > 0
    # KL(P_peer || P_self) averaged over the N^2 entries, as the reference's kl_div "mean".
    p_peer, p_self = other.exp().double(), same.exp().double()
    expected = (p_peer * (p_peer.log() - p_self.log())).sum().item() / 36
    assert kl == pytest.approx(expected, rel=1e-4)


def test_mutual_kl_gradient_only_to_self():
    a1, a2 = unit(4, 8, seed=28).requires_grad_(True), unit(4, 8, seed=29).requires_grad_(True)
    b1, b2 = unit(4, 8, seed=30).requires_grad_(True), unit(4, 8, seed=31).requires_grad_(True)
    mutual_kl(view_similarity_log_probs(a1, a2), view_similarity_log_probs(b1, b2)).backward()
    assert a1.grad is not None and a1.grad.abs().sum() > 0
    assert b1.grad is None and b2.grad is None
