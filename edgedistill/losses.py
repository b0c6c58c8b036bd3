"""Pure loss functions. Every embedding argument is expected L2-normalised unless said otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo InfoNCE: cross-entropy over [q.k, q.queue] / T with the positive at index 0.

    q, k: [N, D]; queue: [K, D] negatives.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.float(), target)


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DisCo's distillation term: mean over the batch of ||s - t||^2 = 2 - 2cos(s, t).

    The DisCo reference code sums (MSELoss(reduction="sum")) over a per-GPU batch of 32 with
    weight 1; a mean times weight 32 reproduces it at that batch size and, unlike the sum,
    keeps the balance against the mean-reduced InfoNCE when the batch size changes.
    """
    return (student.float() - teacher.float()).pow(2).sum(dim=1).mean()


def seed_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    teacher_temperature: float = 1e-4,
    student_temperature: float = 0.2,
) -> torch.Tensor:
    """SEED: cross-entropy between the teacher's and the student's similarity distributions
    over [the teacher embedding itself, the queue of teacher embeddings]."""
    bank = torch.cat([teacher.unsqueeze(1), queue.unsqueeze(0).expand(teacher.shape[0], -1, -1)], dim=1)
    t_logits = torch.einsum("nd,nkd->nk", teacher.float(), bank.float()) / teacher_temperature
    s_logits = torch.einsum("nd,nkd->nk", student.float(), bank.float()) / student_temperature
    return -(F.softmax(t_logits, dim=1) * F.log_softmax(s_logits, dim=1)).sum(dim=1).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR NT-Xent over 2N views: each view's positive is the other view of its image."""
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0).float()
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def view_similarity_log_probs(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Row-wise log-softmax of the N x N cosine-similarity matrix between two views / T (DoGo)."""
    return F.log_softmax((z1.float() @ z2.float().t()) / temperature, dim=1)


def mutual_kl(log_p_self: torch.Tensor, log_p_peer: torch.Tensor) -> torch.Tensor:
    """DoGo mutual learning: KL(P_peer || P_self) with the peer detached, mean over N^2 entries."""
    return F.kl_div(log_p_self, log_p_peer.detach(), reduction="mean", log_target=True)
