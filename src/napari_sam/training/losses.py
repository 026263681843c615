"""SAM's training losses (Kirillov et al. 2023, sec. 3 and appendix A).

The mask loss is a 20:1 linear combination of focal loss (Lin et al. 2017) and dice loss
(Milletari et al. 2016); the IoU head is trained with the mean squared error between the
predicted IoU and the IoU of the predicted mask with the ground truth. For an ambiguous
prompt with three outputs only the output of lowest mask loss is back-propagated.
"""

from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss per mask.

    Args:
        logits: ...xHxW mask logits.
        target: ...xHxW float (0 or 1) ground truth of the same shape.
        eps: smoothing added to numerator and denominator.

    Returns:
        ... per-mask losses in [0, 1].
    """
    prob = logits.sigmoid().flatten(-2)
    tgt = target.flatten(-2)
    overlap = (prob * tgt).sum(-1)
    return 1.0 - (2.0 * overlap + eps) / (prob.sum(-1) + tgt.sum(-1) + eps)


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """20 x focal + 1 x dice, per mask.

    Args:
        logits: KxCxHxW mask logits (C candidate outputs per object).
        target: KxHxW bool or float ground truth.

    Returns:
        KxC losses.
    """
    tgt = target.float().unsqueeze(1).expand_as(logits)
    focal = sigmoid_focal_loss(logits, tgt, alpha=0.25, gamma=2.0, reduction="none").flatten(-2).mean(-1)
    return FOCAL_WEIGHT * focal + DICE_WEIGHT * dice_loss(logits, tgt)


@torch.no_grad()
def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded masks (logit > 0) with the ground truth.

    Args:
        logits: KxCxHxW mask logits.
        target: KxHxW bool ground truth.

    Returns:
        KxC float IoU (1 where both masks are empty).
    """
    pred = logits > 0
    tgt = target.bool().unsqueeze(1)
    inter = (pred & tgt).flatten(-2).sum(-1).float()
    union = (pred | tgt).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def best_object_iou(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IoU of each mask with the ground-truth object it overlaps best.

    Args:
        masks: PxCxHxW bool masks (C outputs per prompt).
        labels: HxW integer label image, 0 = background, one id per object.

    Returns:
        PxC float32 IoU, the maximum over the objects of ``labels`` (0 when it has none).
    """
    flat = masks.flatten(2).float()
    ids = torch.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return torch.zeros(flat.shape[:2], device=flat.device)
    objects = (labels.reshape(1, -1).to(flat.device) == ids[:, None].to(flat.device)).float()
    inter = flat @ objects.T  # P x C x objects
    union = flat.sum(-1, keepdim=True) + objects.sum(-1) - inter
    return (inter / union.clamp(min=1)).amax(-1)
