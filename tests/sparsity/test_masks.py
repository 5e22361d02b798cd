import pytest
import torch
from torch import nn

from hwaware.sparsity import (
    cubic_fraction, find_prunable, gradual_mask_24, is_mask_24, magnitude_mask_24, sr_ste_decay_, weight_2d,
)


def _reference_mask(w2d):
    # brute force: per group of 4, the two largest |w| (ties: lower position), one group at a time
    n, k = w2d.shape
    mask = torch.zeros(n, k, dtype=torch.bool)
    for r in range(n):
        for g in range(0, k, 4):
            vals = [(-abs(float(w2d[r, g + i])), i) for i in range(4)]
            for _, i in sorted(vals)[:2]:
                mask[r, g + i] = True
    return mask


@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (16, 64)])
def test_magnitude_mask_matches_brute_force(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    w[0, :4] = torch.tensor([1.0, -1.0, 1.0, 0.5])  # a tie: positions 0 and 1 win (lower first)
    m = magnitude_mask_24(w)
    assert torch.equal(m, _reference_mask(w))
    assert is_mask_24(m) and int(m.sum()) == w.numel() // 2


def test_gradual_mask_is_monotone_and_ends_at_one_shot():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    cur = torch.ones_like(w, dtype=torch.bool)
    pruned_before = torch.zeros(8, 8, dtype=torch.bool)
    for f in (0.1, 0.3, 0.6, 1.0):
        cur = gradual_mask_24(w, cur, f)
        pruned = ~cur.reshape(8, 8, 4).all(-1)
        assert int(pruned.sum()) == round(f * 64)
        assert bool((pruned | ~pruned_before).all())  # once pruned, pruned for good
        pruned_before = pruned
    assert torch.equal(cur, magnitude_mask_24(w))


def test_gradual_mask_prunes_the_cheapest_groups_first():
    w = torch.ones(1, 12)
    w[0, 4:8] = torch.tensor([0.01, 0.02, 5.0, 6.0])  # group 1 loses 0.03 when pruned; the others 2.0
    m = gradual_mask_24(w, torch.ones_like(w, dtype=torch.bool), 1 / 3)
    assert m[0, 4:8].tolist() == [False, False, True, True] and m[0, :4].all() and m[0, 8:].all()


def test_find_prunable_skips_with_reasons():
    model = nn.Sequential(nn.Linear(13, 8), nn.Linear(8, 4), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Embedding(10, 8),
                          nn.Linear(4, 4))
    layers, skipped = find_prunable(model, skip=["5"])
    assert set(layers) == {"1", "3"}
    assert "K=13" in skipped["0"] and "skip pattern '5'" in skipped["5"]
    assert "K=27" in skipped["2"] and "im2col" in skipped["2"]  # Conv2d(3, 4, 3): 3 * 3 * 3
    assert "4" not in skipped  # embeddings are never candidates


def test_find_prunable_skip_matches_parents_and_refuses_typos():
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 4))
    layers, skipped = find_prunable(model, skip=["0"])  # a parent's name skips its layers, as in QAT
    assert set(layers) == {"1"} and set(skipped) == {"0.0", "0.1"}
    with pytest.raises(ValueError, match=r"skip pattern 'O\.\*' matches no layer of Sequential; the Linear/Conv "
                                         r"layers are: 0\.0, 0\.1, 1"):
        find_prunable(model, skip=["O.*"])


def test_conv_im2col_view():
    conv = nn.Conv2d(4, 6, 3)
    w2d = weight_2d(conv)
    assert w2d.shape == (6, 36) and w2d.data_ptr() == conv.weight.data_ptr()
    cl = nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)  # not [N, K] in memory: read as a copy
    assert torch.equal(weight_2d(cl), cl.weight.detach().contiguous().reshape(6, 36))


@pytest.mark.parametrize("norm", ["parametrize", "hook"])
def test_weight_normalized_layers_stay_dense_and_are_not_taken_for_shared_weights(norm):
    # m.weight of a parametrized layer is a new tensor on every read: a mask on it reached nothing
    # (training ran dense), and ids reused between reads made unrelated layers "share" a weight
    import warnings

    wn = torch.nn.utils.parametrizations.weight_norm if norm == "parametrize" else torch.nn.utils.weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based one is deprecated, still used
        model = nn.Sequential(nn.Conv1d(8, 8, 1), wn(nn.Conv1d(8, 8, 1)), wn(nn.Conv1d(8, 8, 1)), wn(nn.Linear(8, 8)),
                              nn.Linear(8, 8))
    for _ in range(3):  # the same plan every time
        layers, skipped = find_prunable(model)
        assert set(layers) == {"0", "4"} and set(skipped) == {"1", "2", "3"}
        assert all("its weight is computed (weight_norm or another parametrization)" in why for why in skipped.values())


def test_cubic_schedule():
    assert cubic_fraction(0, 10) == 0.0 and cubic_fraction(10, 10) == 1.0 and cubic_fraction(20, 10) == 1.0
    assert cubic_fraction(5, 10) == pytest.approx(0.875)


def test_sr_ste_decay_only_touches_pruned_weights():
    w = torch.randn(2, 8)
    m = magnitude_mask_24(w)
    g = torch.zeros_like(w)
    sr_ste_decay_(g, w, m, 0.5)
    assert torch.equal(g[m], torch.zeros(int(m.sum()))) and torch.equal(g[~m], 0.5 * w[~m])


def test_weights_tied_to_embeddings_or_shared_are_not_pruned_twice():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight  # tied LM head
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight

    layers, skipped = find_prunable(LM())
    assert set(layers) == {"a"}
    assert "tied to embedding 'emb'" in skipped["head"] and "shares its weight with 'a'" in skipped["b"]


def test_find_prunable_leaves_a_layer_its_parent_multiplies_itself():
    # MultiheadAttention reads out_proj.weight directly: a 2:4 mask there costs accuracy and no kernel uses it
    enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    layers, skipped = find_prunable(enc)
    assert set(layers) == {"linear1", "linear2"}
    assert skipped["self_attn.out_proj"].startswith("its parent MultiheadAttention multiplies .weight itself, so no 2:4 "
                                                    "kernel runs it and export stores it dense")


def test_layers_masks_do_not_cover_are_listed_with_the_reason():
    model = nn.Sequential(nn.Linear(8, 8), nn.ConvTranspose2d(8, 8, 2), nn.Conv3d(4, 4, 1))
    layers, skipped = find_prunable(model)
    assert set(layers) == {"0"}
    assert skipped == {"1": "no 2:4 masks for ConvTranspose2d (Linear and Conv1d/2d only): stays dense",
                       "2": "no 2:4 masks for Conv3d (Linear and Conv1d/2d only): stays dense"}
