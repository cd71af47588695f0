"""BLIP-2 and InstructBLIP Q-Former weights load into fovea's QFormer and give transformers' outputs."""

from __future__ import annotations

import pytest
import torch

from fovea.checkpoint import load_model, save_model
from fovea.connectors import QFormer
from fovea.interop.blip2 import load_blip2_into, load_qformer

QCFG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, encoder_hidden_size=24,
            cross_attention_frequency=2, vocab_size=50, max_position_embeddings=20)


def _features(b=2, c=24, h=3, w=4):
    torch.manual_seed(1)
    feats = torch.randn(b, c, h, w)
    return feats, feats.flatten(2).transpose(1, 2)  # (B,C,h,w) and the same as tokens (B,h*w,C)


def _randomise(model):
    """transformers zero-initialises query tokens and sets LayerNorms to 1/0: make every tensor count."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_blip2_qformer_model_parity(tmp_path):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    peer = _randomise(Blip2QFormerModel(Blip2QFormerConfig(**QCFG)))
    peer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="query_tokens"):
        ours = load_qformer(tmp_path, num_queries=6, out_dim=16)
    feats, tokens = _features()
    with torch.no_grad():
        queries = ours.query_tokens.expand(2, -1, -1)
        expected = peer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state
        got = ours.query_states(feats)
    assert got.shape == expected.shape == (2, 6, 32)
    assert (got - expected).abs().max().item() < 1e-5


def test_attention_map_equals_transformers_cross_attentions(tmp_path):
    """Where the Q-Former looked is BLIP-2's own cross-attention probabilities, averaged over layers, heads and
    queries, laid out on the feature grid."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    peer = _randomise(Blip2QFormerModel(Blip2QFormerConfig(**QCFG)))
    peer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="query_tokens"):
        ours = load_qformer(tmp_path, num_queries=6, out_dim=16)
    peer.set_attn_implementation("eager")  # the implementation that returns attention probabilities
    feats, tokens = _features()
    with torch.no_grad():
        queries = ours.query_tokens.expand(2, -1, -1)
        crosses = peer(query_embeds=queries, encoder_hidden_states=tokens, output_attentions=True).cross_attentions
        expected = torch.stack([a for a in crosses if a is not None]).mean(dim=(0, 2, 3)).view(2, 3, 4)  # (B,h,w)
        got = ours.attention_map(feats)
    assert got.shape == (2, 3, 4)
    assert torch.allclose(got.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    assert (got - expected).abs().max().item() < 1e-6


def test_blip2_full_model_query_tokens_and_projection(tmp_path):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    cfg = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=14),
        qformer_config=QCFG, text_config=dict(model_type="opt", hidden_size=40, num_hidden_layers=1,
                                              num_attention_heads=4, ffn_dim=64, vocab_size=100,
                                              word_embed_proj_dim=40), num_query_tokens=5,
    )
    peer = _randomise(Blip2ForConditionalGeneration(cfg))
    peer.save_pretrained(tmp_path)
    ours = load_qformer(tmp_path)
    assert ours.num_queries == 5 and ours.proj_out.out_features == 40
    feats, tokens = _features()
    with torch.no_grad():
        image = peer.vision_model.post_layernorm(tokens)  # BLIP-2's Q-Former reads its ViT's normalised output
        query = peer.qformer(query_embeds=peer.query_tokens.expand(2, -1, -1), encoder_hidden_states=image)
        expected = peer.language_projection(query.last_hidden_state)
        got = ours(feats)
    assert (got - expected).abs().max().item() < 1e-5


def test_instructblip_qformer_with_instruction_parity(tmp_path):
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    peer = _randomise(InstructBlipQFormerModel(InstructBlipQFormerConfig(**QCFG)))
    peer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning):
        ours = load_qformer(tmp_path, num_queries=4, out_dim=16)
    assert ours.has_own_vocabulary
    feats, tokens = _features()
    ids = torch.tensor([[5, 9, 13, 2, 7], [4, 4, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # the second instruction is padded
    with torch.no_grad():
        queries = ours.query_tokens.expand(2, -1, -1)
        full_mask = torch.cat([torch.ones(2, 4, dtype=torch.long), mask], dim=1)  # as InstructBLIP builds it
        expected = peer(input_ids=ids, attention_mask=full_mask, query_embeds=queries,
                        encoder_hidden_states=tokens).last_hidden_state[:, :4]
        got = ours.query_states(feats, text_ids=ids, text_mask=mask)
        alone = ours.query_states(feats[1:], text_ids=ids[1:, :3])  # padding changes nothing
    assert (got - expected).abs().max().item() < 1e-5
    assert (got[1:] - alone).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="its own vocabulary"):
        ours(feats, text_embeds=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 50\)"):
        ours(feats, text_ids=torch.tensor([[60, 1], [1, 1]]))


def test_mismatched_encoder_width_is_named_or_skipped(tmp_path):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    Blip2QFormerModel(Blip2QFormerConfig(**QCFG)).save_pretrained(tmp_path)
    target = QFormer(in_channels=64, out_dim=16, num_queries=4, dim=32, num_layers=3, heads=4,
                     intermediate_size=48, image_norm=False, position_encoding=False)
    with pytest.raises(ValueError, match=r"layers.0.crossattention.key.weight: checkpoint \(32, 24\) vs \(32, 64\)"):
        load_blip2_into(target, str(tmp_path))
    report = load_blip2_into(target, str(tmp_path), skip_mismatched=True)
    assert report.skipped == [f"layers.{i}.crossattention.{p}.weight" for i in (0, 2) for p in ("key", "value")]
    assert "layers.1.attention.query.weight" in report.loaded and "query_tokens" in report.fresh
    wrong = QFormer(in_channels=24, out_dim=16, num_queries=4, dim=32, num_layers=2, heads=4, intermediate_size=48)
    with pytest.raises(ValueError, match=r"this Q-Former lacks: \['layers.2"):
        load_blip2_into(wrong, str(tmp_path))


def test_vlm_with_own_vocabulary_qformer_uses_its_tokenizer(tmp_path):
    from conftest import tiny_config
    from PIL import Image
    from transformers import PreTrainedTokenizerFast

    from fovea import VLM

    cfg = tiny_config("fastvit-mci0", "qformer", instruction_aware=True, text_vocab_size=40)
    with pytest.raises(ValueError, match="instruction_tokenizer"):
        VLM.from_config(cfg)
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {w: i for i, w in enumerate(["[UNK]", "what", "is", "the", "total", "?"])}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    qtok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    model = VLM.from_config(cfg, instruction_tokenizer=qtok).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the total ?"}]}]
    prompt = model.processor()(msgs, [Image.new("RGB", (64, 64), "white")])
    assert prompt.instructions[0].tolist() == [1, 2, 3, 4, 5]
    with torch.no_grad():
        logits = model(prompt.input_ids[None], [prompt.images[0].pixels], prompt.instructions).logits
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(again(prompt.input_ids[None], [prompt.images[0].pixels], prompt.instructions).logits,
                           logits)
    assert again.processor()(msgs, [Image.new("RGB", (64, 64))]).instructions[0].tolist() == [1, 2, 3, 4, 5]
