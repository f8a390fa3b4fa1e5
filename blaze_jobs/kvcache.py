"""The key/value cache of a continuously batched generation: rows join, step and leave.

Row i holds its n_i cached tokens right-aligned in the cache's ``width`` columns. The
attention mask hides the width - n_i columns to their left, and the row's position ids count
its own tokens only, so a sequence computes what it would compute alone, up to the rounding
of batched kernels. Joining rows are prefilled together (left-padded to the longest prompt)
and merged in, the narrower cache padded on the left; leaving rows are dropped, and so are
the columns no remaining row needs.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class UnsupportedCache(Exception):
    """The model's cache is not plain full attention (sliding windows, linear attention)."""


class BatchCache:
    """One model's batch of rows and their key/value cache."""

    def __init__(self, model: Any, *, pad_token_id: int) -> None:
        self.model = model
        self.device = model.device
        self.pad_token_id = pad_token_id
        self.lengths: list[int] = []  # cached tokens of each row
        self.width = 0
        self._cache: Any = None
        # Forward keyword names changed across transformers versions.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def check(self) -> None:
        """Raise UnsupportedCache unless the model's cache is one this class can batch."""
        try:
            kinds = {type(layer).__name__ for layer in DynamicCache(config=self.model.config).layers}
        except (TypeError, AttributeError):  # transformers before 4.56
            kinds = {"DynamicCache without layers"}
        if kinds != {"DynamicLayer"}:
            raise UnsupportedCache(f"continuous batching needs full-attention cache layers; this model's are {sorted(kinds)}")
        with torch.inference_mode():
            ids = torch.tensor([[self.pad_token_id]])
            self._forward(ids, torch.ones_like(ids), torch.zeros_like(ids), self._new_cache())

    def add(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill ``prompts`` as new rows after the others; returns each one's next-token
        logits. If the model call fails, the batch is as it was."""
        # 1. The new rows alone, left-padded to the longest prompt.
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward(ids, mask, positions, cache)

        # 2. Merged into the batch: the narrower cache is padded on the left.
        if not self.lengths:
            self._cache, self.width = cache, width
        else:
            total = max(self.width, width)
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                mine.replace(
                    torch.cat([_pad_left(mine.keys, total), _pad_left(theirs.keys, total)]),
                    torch.cat([_pad_left(mine.values, total), _pad_left(theirs.values, total)]),
                )
            self.width = total
        self.lengths += lengths
        return logits

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to each row; returns each row's next-token logits. If the model
        call fails, the cache is in no known state: ``clear`` it."""
        width = self.width + 1
        cached = torch.tensor(self.lengths) + 1
        mask = (torch.arange(width)[None, :] >= (width - cached)[:, None]).long()
        positions = torch.tensor(self.lengths)[:, None]
        logits = self._forward(torch.tensor(tokens)[:, None], mask, positions, self._cache)
        self.width = width
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices, in order), and only the columns they need."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, device=self.device)
        lengths = [self.lengths[i] for i in rows]
        start = self.width - max(lengths)
        for layer in self._cache.layers:
            layer.replace(layer.keys[index, :, start:, :], layer.values[index, :, start:, :])
        self.lengths, self.width = lengths, max(lengths)

    def clear(self) -> None:
        self.lengths, self.width, self._cache = [], 0, None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw:
            kwargs[self._keep_kw] = 1  # the last position's logits are all sampling needs
        with attention_kernels(self.device):
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                **kwargs,
            )
        return out.logits[:, -1, :].float()

    def _new_cache(self) -> Any:
        cache = DynamicCache(config=self.model.config)
        cache.layers = [_GrowingLayer() for _ in cache.layers]
        return cache


class _GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views of buffers with spare
    columns: a decoding step writes its column in place, where ``DynamicLayer`` copies the
    whole cache (a third of a step's time at batch 64 on a CPU)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys is None or self.values is None or self.keys.numel() == 0:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            return self.replace(key_states, value_states)
        width, new = self.keys.shape[-2], key_states.shape[-2]
        if width + new > self._key_buffer.shape[-2]:
            self.replace(self.keys, self.values, spare=new)
        self._key_buffer[:, :, width : width + new] = key_states
        self._value_buffer[:, :, width : width + new] = value_states
        self.keys = self._key_buffer[:, :, : width + new]
        self.values = self._value_buffer[:, :, : width + new]
        return self.keys, self.values

    def replace(self, keys: torch.Tensor, values: torch.Tensor, *, spare: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold ``keys`` and ``values`` ([batch, heads, length, dim]) in fresh buffers with room to grow;
        return the views of them the layer now holds."""
        width = keys.shape[-2]
        capacity = width + spare + max(32, width // 2)
        self._key_buffer = keys.new_empty((*keys.shape[:-2], capacity, keys.shape[-1]))
        self._value_buffer = values.new_empty((*values.shape[:-2], capacity, values.shape[-1]))
        self._key_buffer[:, :, :width] = keys
        self._value_buffer[:, :, :width] = values
        self.keys = self._key_buffer[:, :, :width]
        self.values = self._value_buffer[:, :, :width]
        return self.keys, self.values


def attention_kernels(device: torch.device) -> Any:
    """On CUDA, scaled-dot-product attention without the cuDNN kernel: with a padding mask it
    builds a plan for every new shape (about 50 ms on an H100 with torch 2.11), and a batch
    that grows by a column each step is a new shape every step. The flash and memory-efficient
    kernels run the same step in about 4 ms."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` ([batch, heads, length, dim]) with zero columns added on the left up to ``width``."""
    missing = width - tensor.shape[-2]
    if missing <= 0:
        return tensor
    pad = tensor.new_zeros((*tensor.shape[:-2], missing, tensor.shape[-1]))
    return torch.cat([pad, tensor], dim=-2)
