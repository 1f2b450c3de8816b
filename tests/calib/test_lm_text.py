"""The lm-adapter's text: an LM's samples read by the teacher's tokenizer, lined up token by token."""

from __future__ import annotations

import torch
from transformers import BertTokenizerFast

from calib.config import ModelSource, RandomModel, TaskConfig
from calib.generators.lm_adapter import LMAdapterGenerator, aligned_features
from calib.lm_text import align_tokens, write_text
from calib.models import embedding_table, load_backbone
from tests.models import SPECIAL_TOKENS, tiny_teacher

WORDS = [f"word{i}" for i in range(60)]  # more than the LM sampler's top-k of 50


def test_each_teacher_token_takes_the_lm_token_under_its_first_character():
    # text "unhappy cats": the LM reads "un|happy| cats", the teacher "[CLS] unh|##appy cat|##s [SEP] [PAD]"
    lm_offsets = [(0, 2), (2, 7), (7, 12)]
    teacher_offsets = [(0, 0), (0, 3), (3, 7), (8, 11), (11, 12), (0, 0), (0, 0)]
    assert align_tokens(teacher_offsets, lm_offsets) == [0, 0, 1, 2, 2, 2, 2]


def _word_tokenizer(words: list[str]) -> BertTokenizerFast:
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS + words)})


def test_text_of_another_vocabulary_is_framed_by_the_teacher_and_aligned_word_for_word():
    lm_tokenizer = _word_tokenizer(WORDS)
    teacher_tokenizer = _word_tokenizer(list(reversed(WORDS)))  # same words, other ids
    spec = RandomModel(family="gpt2", vocab_size=len(SPECIAL_TOKENS) + len(WORDS))
    lm = load_backbone(ModelSource(random=spec), TaskConfig(kind="causal-lm"))
    text = write_text(lm, 6, 12, 4, seed=0, tokenizers=(lm_tokenizer, teacher_tokenizer))
    assert text.teacher_ids.shape == (6, 12) and text.alignment.shape == (6, 12)
    for ids, mask, lm_ids, alignment in zip(text.teacher_ids, text.attention_mask, text.lm_ids, text.alignment):
        length = int(mask.sum())
        tokens = teacher_tokenizer.convert_ids_to_tokens(ids[:length].tolist())
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and length >= 2
        lm_tokens = lm_tokenizer.convert_ids_to_tokens(lm_ids.tolist())
        for position in range(1, length - 1):  # every word sits on the same word in the LM's row
            assert lm_tokens[alignment[position]] == tokens[position]


def test_a_decoder_generating_for_itself_keeps_its_ids_and_varies_lengths():
    teacher = tiny_teacher("gpt2")
    text = write_text(teacher.backbone, 8, 16, 5, seed=1)
    lengths = text.attention_mask.sum(1)
    assert ((lengths >= 5) & (lengths <= 16)).all() and len(set(lengths.tolist())) > 1
    assert torch.equal(text.teacher_ids, text.lm_ids * text.attention_mask)
    assert torch.equal(text.alignment[0], torch.arange(16))


def test_the_generator_starts_from_the_texts_own_embeddings():
    teacher = tiny_teacher("gpt2")
    text = write_text(teacher.backbone, 8, 16, 5, seed=1)
    with torch.no_grad():
        features = aligned_features(teacher.backbone, text.lm_ids, text.lm_mask, text.alignment)
    table = embedding_table(teacher)
    generator = LMAdapterGenerator(text, features, table, noise_dim=8, hidden=32, radius=0.25)
    rng = torch.Generator().manual_seed(0)
    rows = torch.randint(8, (4,), generator=torch.Generator().manual_seed(0))
    batch = generator.sample(4, rng)
    mask = text.attention_mask[rows]
    assert torch.equal(batch.attention_mask, mask)
    expected = table[text.teacher_ids[rows]] * mask.unsqueeze(-1)
    gap = (batch.inputs_embeds - expected).norm(dim=-1)[mask.bool()]
    assert gap.max() < 0.05 * table.norm(dim=-1).mean()  # a small residual, not a new embedding
