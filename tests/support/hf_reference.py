"""Greedy generation by HF transformers, the reference that pagedserve's tokens must equal."""

import torch


def hf_greedy(
    model: torch.nn.Module, prompt_token_ids: list[int], max_new_tokens: int, eos_token_ids: list[int]
) -> list[int]:
    """Generated ids, ending with the EOS id when one was produced."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_token_ids]),
            attention_mask=torch.ones(1, len(prompt_token_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_ids,
            pad_token_id=eos_token_ids[0],
        )
    return output[0, len(prompt_token_ids) :].tolist()
