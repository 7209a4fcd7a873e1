"""Importance of attention heads, FFN neurons and hidden channels, and DynaBERT's network
rewiring: sorting them so that the prefixes a search space keeps are the most important units
(Hou et al. 2020, "DynaBERT"; Michel et al. 2019 for head importance; Muralidharan et al. 2024,
"Minitron", for the activation-based importance of hidden channels)."""

from __future__ import annotations

import torch

from nas_prune.supernet import EncoderForSequenceClassification


def importance(model: EncoderForSequenceClassification, batches) -> tuple[list, list]:
    """Per-layer importance of each head and each FFN neuron on the full network.

    The importance of a unit is |dL/dg| for a gate g multiplying its output (Michel et al. 2019
    for heads, DynaBERT for neurons), accumulated over `batches` (dicts of tensors with
    `labels`). The gate's gradient needs no gate: for head h it equals the sum over the output
    projection's columns of h of weight x gradient, and likewise for a neuron with the FFN's
    down projection.
    """
    model.reset_super_network()
    was_training = model.training
    model.eval()
    dim = model.config.head_dim
    heads = [torch.zeros(layer.attention.num_heads) for layer in model.layers]
    units = [torch.zeros(layer.ffn.up.out_features) for layer in model.layers]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for i, layer in enumerate(model.layers):
            out = layer.attention.out.weight
            per_col = (out * out.grad).sum(0).detach().cpu()
            heads[i] += per_col.view(-1, dim).sum(1).abs()
            down = layer.ffn.down.weight
            units[i] += (down * down.grad).sum(0).detach().cpu().abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return heads, units


@torch.no_grad()
def hidden_importance(model: EncoderForSequenceClassification, batches) -> torch.Tensor:
    """Importance of each hidden channel of the full network (Minitron): the mean over the real
    tokens of `batches` (dicts of tensors, as for `importance`) and over every point of the
    residual stream (the embeddings' output and each attention and FFN block's output, all
    after their LayerNorm) of the channel's |activation|."""
    model.reset_super_network()
    was_training = model.training
    model.eval()
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    weights: list[torch.Tensor] = []  # the current batch's (batch, tokens, 1) token mask

    def on_stream(_module, _inputs, out: torch.Tensor) -> None:
        total.add_((out.abs().double() * weights[0]).sum((0, 1)).cpu())

    blocks = [model.embeddings]
    blocks += [b for layer in model.layers for b in (layer.attention, layer.ffn) if b is not None]
    handles = [block.register_forward_hook(on_stream) for block in blocks]
    tokens = 0.0
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
            weights[:] = [mask[..., None].double()]
            tokens += float(mask.sum())
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration tokens: give at least one batch with real tokens")
    return (total / (tokens * len(blocks))).float()


def rewire(model: EncoderForSequenceClassification, batches,
           orders: dict | None = None) -> tuple[list, list, torch.Tensor]:
    """Sort every layer's heads and neurons, and the hidden channels, by decreasing importance
    (DynaBERT rewiring; `importance` and `hidden_importance` over `batches`), so that prefix
    sub-networks keep the most important units. Returns the importances (heads, neurons,
    hidden channels) in the new order; `orders`, when given, receives the hidden channels'
    permutation under "hidden" (new channel j = old channel orders["hidden"][j])."""
    batches = list(batches)
    heads, units = importance(model, batches)
    hidden = hidden_importance(model, batches)
    head_order = [torch.argsort(h, descending=True, stable=True) for h in heads]
    unit_order = [torch.argsort(u, descending=True, stable=True) for u in units]
    hidden_order = torch.argsort(hidden, descending=True, stable=True)
    model.reorder(head_order, unit_order, hidden_order)
    if orders is not None:
        orders["hidden"] = hidden_order.tolist()
    return (
        [h[o] for h, o in zip(heads, head_order, strict=True)],
        [u[o] for u, o in zip(units, unit_order, strict=True)],
        hidden[hidden_order],
    )
