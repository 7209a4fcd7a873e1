"""Importance of attention heads and FFN neurons, and DynaBERT's network rewiring: sorting them
so that the prefixes a search space keeps are the most important units (Hou et al. 2020,
"DynaBERT"; Michel et al. 2019 for head importance)."""

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


def rewire(model: EncoderForSequenceClassification, batches) -> tuple[list, list]:
    """Sort every layer's heads and neurons by decreasing importance (DynaBERT rewiring), so
    that prefix sub-networks keep the most important units. Returns the importances in the
    new order."""
    heads, units = importance(model, batches)
    head_order = [torch.argsort(h, descending=True, stable=True) for h in heads]
    unit_order = [torch.argsort(u, descending=True, stable=True) for u in units]
    model.reorder(head_order, unit_order)
    return (
        [h[o] for h, o in zip(heads, head_order, strict=True)],
        [u[o] for u, o in zip(units, unit_order, strict=True)],
    )
