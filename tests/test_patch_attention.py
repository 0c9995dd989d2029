"""`QVLM.patch_attention`: the query attention maps that `qvlm report` draws and `qvlm serve` sends."""

import torch

from qvlm.models.processing import DEFAULT_CAPTION_PROMPT
from qvlm.models.vlm import QVLM


def test_maps_cover_the_patch_grid_and_sum_to_one_per_query(tiny_config, tiny_images):
    model = QVLM.build(tiny_config, stage=1).eval()
    features = model.encode_images(tiny_images[:3])  # [3, 1 + G*G, Dv]: the ViT's CLS token first
    side, nq = model.vision.patch_grid, model.qformer.num_queries
    assert features.shape[1] == 1 + side * side
    maps = model.patch_attention(features)
    assert maps.shape == (3, nq, side, side)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(3, nq))
    # The patches' share of the query attention (CLS dropped), renormalised, in raster order.
    patches = model.qformer.query_attention(features)[..., 1:]  # [3, Nq, G*G]
    torch.testing.assert_close(maps.flatten(2), patches / patches.sum(-1, keepdim=True))
    assert not torch.allclose(maps[0], maps[1])  # it follows the image
    assert torch.equal(model.patch_attention(features, ["what is it?"] * 3), maps)  # text only when instructed


def test_instruction_aware_maps_follow_the_text(tiny_config, tiny_images):
    torch.manual_seed(0)
    tiny_config.qformer.instruction_aware = True
    model = QVLM.build(tiny_config, stage=1).eval()
    features = model.encode_images(tiny_images[:2])
    captioning = model.patch_attention(features)
    torch.testing.assert_close(captioning, model.patch_attention(features, [DEFAULT_CAPTION_PROMPT] * 2))
    asked = model.patch_attention(features, ["what colour is the car on the left?", "how many?"])
    torch.testing.assert_close(asked.sum((-2, -1)), torch.ones(2, model.qformer.num_queries))
    # A random Q-Former's near-uniform maps move little (~2e-6 here), but far beyond float32 rounding
    # (~1e-9 at values of 1/16): the queries did read the text.
    assert (asked - captioning).abs().max() > 1e-7
    # Texts of different lengths batch together (padded) as they would run alone: the server batches them.
    torch.testing.assert_close(asked[1:], model.patch_attention(features[1:], ["how many?"]))


def test_instruction_aware_maps_read_the_question_as_the_answer_does_behind_its_description(tiny_config,
                                                                                          tiny_images):
    torch.manual_seed(0)
    tiny_config.qformer.instruction_aware = True
    tiny_config.lm.describe_first = True
    model = QVLM.build(tiny_config).eval()
    features = model.encode_images(tiny_images[:1])
    asked = ["is it red?"]
    described = model.described(features, asked)  # ["<the model's own caption>. is it red?"]
    maps = model.patch_attention(features, asked)
    model.config.lm.describe_first = False
    assert torch.equal(maps, model.patch_attention(features, described))
    assert (maps - model.patch_attention(features, asked)).abs().max() > 1e-7  # not the bare question
