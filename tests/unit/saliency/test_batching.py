"""``xattn_lightning.saliency.batching``: mask batch sizes and precision."""

import torch
from helpers import speaking_explain


def test_auto_batch_sizes_off_cuda_take_the_cpu_defaults_and_give_the_same_maps():
    auto = speaking_explain(n_masks=12, batch_size="auto", encoder_batch_size="auto")
    assert auto.results["spes"].details["batch_size"] == 8
    assert auto.results["encoder_spes"].details["batch_size"] == 12  # 1,024 rows of a few tokens, capped at n_masks
    fixed = speaking_explain(n_masks=12, batch_size=8, encoder_batch_size=12)
    for m in ("spes", "encoder_spes"):
        torch.testing.assert_close(auto.saliency[m], fixed.saliency[m], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_gives_nearly_the_same_encoder_map():
    from xattn_lightning.functional import map_similarity

    f32 = speaking_explain(n_masks=32)
    bf16 = speaking_explain(n_masks=32, autocast="bf16")
    assert (
        map_similarity(f32.saliency["encoder_spes"], bf16.saliency["encoder_spes"]) > 0.9
    )  # real tiny.en on an H200: 0.9995
    assert not torch.equal(f32.saliency["encoder_spes"], bf16.saliency["encoder_spes"])  # it did run in bf16


def test_encoder_auto_batch_off_cuda_is_sized_by_explained_tokens_and_changes_no_map():
    from xattn_lightning.saliency.perturbation import CPU_ROWS_PER_BATCH, spes_encoder

    torch.manual_seed(0)
    t, vocab = 9, 11
    weight = torch.randn(t, vocab)

    def maps(tokens: int, batch_size):
        logp = torch.randn(tokens, vocab, generator=torch.Generator().manual_seed(tokens)).log_softmax(-1)
        seen = []

        def run(keep):  # logits that depend on which frames are kept: [B, tokens, V]
            seen.append(keep.shape[0])
            return (keep.float() @ weight).unsqueeze(1).expand(-1, tokens, -1) + torch.arange(tokens).view(1, -1, 1)

        r = spes_encoder(run, t, logp, None, n_masks=40, batch_size=batch_size, seed=3)
        return r.map, r.details, seen

    short, info_s, seen_s = maps(4, "auto")
    assert info_s["batch_size"] == 40 and seen_s == [40]  # few tokens: every mask in one batch
    rows = CPU_ROWS_PER_BATCH // 7 + 1  # 7 masks' rows overflow the budget: 6 per batch
    long, info_l, seen_l = maps(rows, "auto")
    assert info_l["batch_size"] == 6 and max(seen_l) * rows <= CPU_ROWS_PER_BATCH
    for tokens, auto in ((4, short), (rows, long)):
        fixed, _, _ = maps(tokens, 1)
        torch.testing.assert_close(auto, fixed, rtol=1e-5, atol=1e-7)
