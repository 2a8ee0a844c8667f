"""VideoMAE V2 dual masking: the running-cell decoder mask (a pure function of a generator) and the model's
decoder-masked forward, against independent computations."""

import numpy as np
import pytest
import torch

from model import VideoMAE, get_config
from model.checkpoint import official_state_dict
from pipeline.loader.decoder_masking import decoder_masks, num_decoder_kept, running_cell_mask
from pipeline.loader.masking import tube_mask
from tests.model import official_ref as ref

CFG = get_config("tiny", decoder_mask_type="run_cell", decoder_mask_ratio=0.5)


def _cell_maps(t, h, w, ratio):
    """The four masks VideoMAE V2's generator can return, built the way it describes them: a queue of
    ``int(4r)`` ones then zeros, rotated one step before each time slice, read as a 2x2 cell tiled over the
    frame."""
    drop = int(4 * ratio)
    queue = np.array([1] * drop + [0] * (4 - drop))
    maps = []
    for start in range(4):
        frames = [
            np.tile(np.roll(queue, -(start + i + 1)).reshape(2, 2), (h // 2, w // 2)).ravel()
            for i in range(t)
        ]
        maps.append(np.stack(frames).ravel().astype(bool))
    return maps


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_is_one_of_the_official_maps(ratio):
    t, h, w = 4, 6, 8
    maps = _cell_maps(t, h, w, ratio)
    seen = set()
    for seed in range(24):
        mask = running_cell_mask(3, t, h, w, ratio, torch.Generator().manual_seed(seed))
        assert mask.shape == (3, t * h * w) and mask.dtype == torch.bool
        for row in mask.numpy():
            match = [i for i, m in enumerate(maps) if np.array_equal(row, m)]
            assert len(match) == 1
            seen.add(match[0])
        assert int((~mask[0]).sum()) == num_decoder_kept(t, h, w, ratio, "run_cell")
    assert seen == {0, 1, 2, 3}  # every phase is drawn
    a = running_cell_mask(2, t, h, w, ratio, torch.Generator().manual_seed(5))
    assert torch.equal(a, running_cell_mask(2, t, h, w, ratio, torch.Generator().manual_seed(5)))


def test_decoder_mask_helpers_and_validation():
    assert decoder_masks((2, 4, 4), "none", 0.0, [torch.Generator()]) is None
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    batch = decoder_masks((2, 4, 4), "run_cell", 0.5, gens)
    assert batch.shape == (3, 32) and torch.equal(
        batch[1:2], running_cell_mask(1, 2, 4, 4, 0.5, gens[1].manual_seed(1))
    )
    assert (
        num_decoder_kept(8, 14, 14, 0.5, "run_cell") == 784
        and num_decoder_kept(8, 14, 14, 0.0, "none") is None
    )
    with pytest.raises(ValueError, match="decoder_mask_ratio must be 0 with decoder_mask_type 'none'"):
        get_config("tiny", decoder_mask_ratio=0.5)
    with pytest.raises(ValueError, match="model.decoder_mask_ratio must drop 1-3 positions"):
        get_config("tiny", decoder_mask_type="run_cell", decoder_mask_ratio=0.1)
    with pytest.raises(ValueError, match="decoder_mask_type must be one of"):
        get_config("tiny", decoder_mask_type="cell")
    with pytest.raises(ValueError, match="needs an even token grid"):
        get_config("tiny", img_size=24, decoder_mask_type="run_cell", decoder_mask_ratio=0.5)
    assert CFG.num_decoded == 16 and get_config("tiny").num_decoded == get_config("tiny").num_masked


def _model_and_inputs(seed=0):
    torch.manual_seed(seed)
    model = VideoMAE(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 3, CFG.num_frames, CFG.img_size, CFG.img_size, generator=g)
    return model, x, tube_mask(2, *CFG.grid, CFG.mask_ratio, g), running_cell_mask(2, *CFG.grid, 0.5, g)


def test_decoder_masked_forward_matches_the_official_computation():
    """pred over the decoder-kept tokens and the loss over those the encoder did not see, as VideoMAE V2's
    model + engine compute them (``official_ref``, boolean-mask indexing and a weighted loss)."""
    model, x, mask, decoder_mask = _model_and_inputs()
    sd = official_state_dict(model)
    with torch.no_grad():
        loss, pred = model(x, mask, decoder_mask)
        want = ref.pretrain_pred(sd, x, mask, CFG.encoder_heads, CFG.decoder_heads, decoder_mask)
        want_loss = ref.pretrain_loss(x, mask, want, CFG.patch_size, CFG.tubelet_size, decoder_mask)
    assert pred.shape == (2, CFG.num_decoded, CFG.patch_dim)
    assert torch.allclose(pred, want, atol=1e-5) and torch.allclose(loss, want_loss, rtol=1e-5)
    # the visible tokens the decoder also queries carry no loss: changing their predictions changes nothing
    kept = (~decoder_mask).nonzero()[:, 1].view(2, -1)
    weight = torch.gather(mask, 1, kept)
    assert 0 < int(weight.sum()) < weight.numel()
    target = torch.gather(model.target(x), 1, kept[:, :, None].expand(-1, -1, CFG.patch_dim))
    assert torch.allclose(VideoMAE.forward_loss(pred + (~weight)[:, :, None] * 5.0, target, weight), loss)


def test_no_decoder_mask_is_the_v1_forward_and_the_official_fallback():
    """Without a decoder mask the decoder reconstructs every masked token (the golden-loss path); passing
    ``~mask`` (what VideoMAE V2's data pipeline passes without decoder masking) is the same computation."""
    model, x, mask, _ = _model_and_inputs(1)
    with torch.no_grad():
        loss, pred = model(x, mask)
        loss2, pred2 = model(x, mask, ~mask)
    assert pred.shape == (2, CFG.num_masked, CFG.patch_dim)
    assert torch.allclose(pred, pred2, atol=1e-6) and torch.allclose(loss, loss2, rtol=1e-6)


def test_decoder_mask_trains_and_rejects_bad_masks():
    model, x, mask, decoder_mask = _model_and_inputs(2)
    loss, _ = model.train()(x, mask, decoder_mask)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="decoder_mask must be a bool tensor"):
        model(x, mask, decoder_mask.float())
    uneven = decoder_mask.clone()
    uneven[0, :] = True
    uneven[0, 0] = False
    with pytest.raises(ValueError, match="decoder_mask must mask the same number of tokens"):
        model(x, mask, uneven)
    with pytest.raises(ValueError, match="keeps none of the masked tokens"):
        model(x, mask, mask)
    with pytest.raises(ValueError, match="drops all"):
        model(x, mask, torch.ones_like(mask))
