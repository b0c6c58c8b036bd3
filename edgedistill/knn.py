"""Weighted kNN top-1 on frozen features (InstDisc / DINO protocol): a pure function, shared by
`eval` and the teacher's fidelity check (methods/components.py); a leaf module (torch only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_top1(train_f, train_y, val_f, val_y, k: int, temperature: float, num_classes: int, chunk: int = 512) -> float:
    """Weighted kNN top-1 (percent) on cosine similarity."""
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    k = min(k, train_f.shape[0])
    correct = 0
    for start in range(0, val_f.shape[0], chunk):
        sim = val_f[start : start + chunk] @ train_f.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == val_y[start : start + chunk]).sum().item()
    return 100.0 * correct / val_f.shape[0]
