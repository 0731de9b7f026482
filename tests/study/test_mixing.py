"""Mixup and CutMix: seeded by (seed, epoch, step), labels weighted by the mixed share."""

from __future__ import annotations

import torch

from kdgqa.study.mixing import mix_batch


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8)
    return x, torch.tensor([0, 1, 2, 3])


def test_the_same_seed_epoch_and_step_mix_the_same_way():
    x, y = _batch()
    a = mix_batch(x, y, mixup=0.8, cutmix=1.0, prob=1.0, seed=3, epoch=1, step=5)
    b = mix_batch(x, y, mixup=0.8, cutmix=1.0, prob=1.0, seed=3, epoch=1, step=5)
    assert a is not None and b is not None
    assert torch.equal(a.images, b.images) and a.lam == b.lam
    assert torch.equal(a.partner_labels, b.partner_labels)
    others = [mix_batch(x, y, mixup=0.8, cutmix=1.0, prob=1.0, seed=3, epoch=1, step=s)
              for s in range(6, 12)]
    assert any(o is not None and o.lam != a.lam for o in others)


def test_mixup_blends_whole_images_with_the_label_weight():
    x, y = _batch()
    m = mix_batch(x, y, mixup=1.0, cutmix=0.0, prob=1.0, seed=0, epoch=0, step=0)
    assert m is not None and 0 < m.lam < 1
    partner = x[torch.tensor([int((y == t).nonzero()) for t in m.partner_labels])]
    torch.testing.assert_close(m.images, m.lam * x + (1 - m.lam) * partner)


def test_cutmix_pastes_a_box_and_its_area_sets_the_label_weight():
    x, y = _batch()
    for step in range(20):
        m = mix_batch(x, y, mixup=0.0, cutmix=1.0, prob=1.0, seed=1, epoch=0, step=step)
        assert m is not None
        changed = (m.images != x).any(dim=1)  # (B, H, W): the pasted box (where partners differ)
        moved = m.partner_labels != y
        if bool(moved.any()):
            share = changed[moved].float().mean().item()
            assert abs((1 - m.lam) - share) < 1e-6


def test_off_or_unlucky_batches_stay_as_they_are():
    x, y = _batch()
    assert mix_batch(x, y, mixup=0.0, cutmix=0.0, prob=1.0, seed=0, epoch=0, step=0) is None
    assert mix_batch(x, y, mixup=1.0, cutmix=0.0, prob=0.0, seed=0, epoch=0, step=0) is None
    half = [mix_batch(x, y, mixup=1.0, cutmix=0.0, prob=0.5, seed=0, epoch=0, step=s)
            for s in range(200)]
    assert 60 < sum(m is not None for m in half) < 140
