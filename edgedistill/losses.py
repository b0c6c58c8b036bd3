"""Pure loss functions. Every embedding argument is expected L2-normalised unless said otherwise.

Every loss runs in fp32 with autocast disabled (`fp32_loss`), whatever precision the model ran
in: under bf16 autocast a matmul would otherwise be computed in bf16, and SEED's 1e-4 teacher
temperature turns bf16's ~3-digit cosines near 1 into logit shifts of tens.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def fp32_loss(fn):
    """Run `fn` with autocast off (CPU and CUDA) and its tensor arguments cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


@fp32_loss
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo InfoNCE: cross-entropy over [q.k, q.queue] / T with the positive at index 0.

    q, k: [N, D]; queue: [K, D] negatives.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.float(), target)


@fp32_loss
def embedding_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DisCo's distillation term: mean over the batch of ||s - t||^2 = 2 - 2cos(s, t).

    The DisCo reference code sums (MSELoss(reduction="sum")) over a per-GPU batch of 32 with
    weight 1; a mean times weight 32 reproduces it at that batch size and, unlike the sum,
    keeps the balance against the mean-reduced InfoNCE when the batch size changes.
    """
    return (student.float() - teacher.float()).pow(2).sum(dim=1).mean()


@fp32_loss
def seed_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    teacher_temperature: float = 1e-4,
    student_temperature: float = 0.2,
) -> torch.Tensor:
    """SEED (Fang et al. 2021): cross-entropy between the teacher's and the student's similarity
    distributions over [the teacher embedding itself, the queue of teacher embeddings].

    target = softmax([t.t, t.Q] / teacher_temperature), prediction = log_softmax([s.t, s.Q] /
    student_temperature), loss = mean over the batch of -sum(target * prediction). The teacher
    side carries no gradient. student, teacher: [N, D]; queue: [K, D] (teacher embeddings of
    earlier batches; the current batch is enqueued after the loss, as in the reference code).
    """
    s, t, q = student.float(), teacher.float().detach(), queue.float().detach()
    t_logits = torch.cat([(t * t).sum(dim=1, keepdim=True), t @ q.t()], dim=1) / teacher_temperature
    s_logits = torch.cat([(s * t).sum(dim=1, keepdim=True), s @ q.t()], dim=1) / student_temperature
    target = F.softmax(t_logits, dim=1)
    return -(target * F.log_softmax(s_logits, dim=1)).sum(dim=1).mean()


@fp32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR NT-Xent over 2N views: each view's positive is the other view of its image, its
    negatives the other 2N - 2 views; mean over the 2N views (the DoGo/SimCLR reference sums the
    cross-entropy and divides by 2N)."""
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0).float()
    sim = z @ z.t() / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


@fp32_loss
def view_similarity_log_probs(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Row-wise log-softmax of the N x N cosine-similarity matrix between two views / T (DoGo)."""
    return F.log_softmax((z1.float() @ z2.float().t()) / temperature, dim=1)


@fp32_loss
def mutual_kl(log_p_self: torch.Tensor, log_p_peer: torch.Tensor) -> torch.Tensor:
    """DoGo mutual learning: KL(P_peer || P_self) with the peer detached, mean over the N^2
    entries (the reference's `F.kl_div(..., reduction="mean")`, which is why its weight is 100).

    Written as sum / numel: the same value as kl_div's "mean", without its per-call warning.
    """
    kl = F.kl_div(log_p_self.float(), log_p_peer.detach().float(), reduction="sum", log_target=True)
    return kl / log_p_self.numel()
