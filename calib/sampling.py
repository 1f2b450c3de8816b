"""Text a causal LM samples itself: LLM-QAT's data-free inputs, and the ZSAQ lm-adapter's token pool."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def sample_sequences(
    lm: PreTrainedModel, samples: int, seq_len: int, seed: int, batch_size: int = 16, top_k: int = 50
) -> torch.Tensor:
    """int64 ``[samples, seq_len]``: each sequence starts from a uniformly drawn token, then samples top-k."""
    rng = torch.Generator().manual_seed(seed)
    vocab = lm.get_output_embeddings().weight.shape[0]
    rows = []
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        ids = torch.randint(vocab, (count, 1), generator=rng)
        past = None
        step_input = ids
        for _ in range(seq_len - 1):
            out = lm(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1].float()
            top = logits.topk(top_k, dim=-1)
            probs = torch.softmax(top.values, dim=-1)
            choice = torch.multinomial(probs, 1, generator=rng)
            step_input = top.indices.gather(-1, choice)
            ids = torch.cat([ids, step_input], dim=1)
        rows.append(ids)
    return torch.cat(rows)
