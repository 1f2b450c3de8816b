"""Calling one transformer block on its own: the arguments a model passes to its blocks (hidden states, the
attention mask in the form the family builds, rotary position embeddings) captured once per batch at the first
block, then any block run on cached hidden states. Block-wise quantizer learning uses it to keep one block's
activations in memory at a time, whatever the family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from calib.inputs import Batch
from calib.models import TaskModel


class _Reached(Exception):
    """Raised by the capturing hook: the rest of the forward is not needed."""


@dataclass
class BlockCall:
    """What a model passes to its blocks for one batch: positional and keyword arguments, the hidden states
    among them taken out (``hidden``), and the key-value cache left out (each call is a fresh full pass)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden: torch.Tensor

    def run(self, block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``block`` on ``hidden`` with this batch's other arguments; its output hidden states."""
        if self.args:
            out = block(hidden, *self.args[1:], **self.kwargs)
        else:
            out = block(**{**self.kwargs, "hidden_states": hidden})
        return out[0] if isinstance(out, tuple) else out


def capture_block_call(model: TaskModel, block: str, batch: Batch) -> BlockCall:
    """Run ``model`` on ``batch`` up to the entry of its block ``block`` (a name under the backbone) and keep
    what the block is called with."""
    seen: dict[str, Any] = {}

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update(args=args, kwargs=kwargs)
        raise _Reached

    handle = model.backbone.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            batch.run(model)
    except _Reached:
        pass
    finally:
        handle.remove()
    # a key-value cache would grow with every call (and attend across them): none, positional or keyword
    args = tuple(None if isinstance(value, Cache) else value for value in seen["args"])
    kwargs = {key: None if isinstance(value, Cache) else value for key, value in seen["kwargs"].items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return BlockCall(args, kwargs, hidden.detach())
