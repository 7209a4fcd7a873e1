"""Importance of the decoder's query heads, KV groups, MLP neurons and hidden channels, and
rewiring: sorting them so that the prefixes a sub-network keeps are the most important units
(DynaBERT, Hou et al. 2020), without changing the full network's function.

Importance is activation-based, as in Minitron (Muralidharan et al. 2024, "Compact Language
Models via Pruning and Knowledge Distillation"), from forward passes over a few calibration
batches, no gradients:

- a query head: the mean over real tokens of the L2 norm of its attention output (before o_proj);
- a KV group: the sum of its query heads' scores;
- an MLP neuron: the mean over real tokens of |act(gate(x)) * up(x)|;
- a hidden channel: the mean over real tokens and over the residual stream at every layer
  boundary (the embeddings and each layer's output) of |x_c|.

The same scores serve both heads (`DecoderForCausalLM`, `DecoderForSequenceClassification`):
they come from the body's activations over every real token, not from the head or its objective,
so a batch's `labels` are ignored and a classifier's new, untrained head does not bias them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nas_prune.decoder import DecoderModel


@dataclass(frozen=True)
class DecoderImportance:
    """Importance scores of the full decoder's units, higher is more important."""

    queries: list[torch.Tensor]
    """Per layer: (KV groups, query heads per group)."""
    units: list[torch.Tensor]
    """Per layer: (MLP neurons,)."""
    hidden: torch.Tensor
    """(hidden channels,)."""

    @property
    def groups(self) -> list[torch.Tensor]:
        """Per layer: (KV groups,), the sum over each group's query heads."""
        return [q.sum(1) for q in self.queries]


@torch.no_grad()
def importance(model: DecoderModel, batches) -> DecoderImportance:
    """Activation-based importance of every unit of the full network (either head) over
    `batches` (dicts with `input_ids` and optionally `attention_mask`; other keys, such as
    `labels`, are ignored)."""
    c = model.config
    if any(x is not None for x in (c.layer_kv_heads, c.layer_queries_per_kv, c.layer_units)):
        raise ValueError("importance applies to a full supernet, not an exported sub-network")
    model.reset_super_network()
    was_training = model.training
    model.eval()
    layers = model.model.layers
    heads = [torch.zeros(c.num_attention_heads, dtype=torch.float64) for _ in layers]
    units = [torch.zeros(c.intermediate_size, dtype=torch.float64) for _ in layers]
    hidden = torch.zeros(c.hidden_size, dtype=torch.float64)
    weights: list[torch.Tensor] = []  # the current batch's (batch, tokens, 1) token mask

    def token_sum(values: torch.Tensor) -> torch.Tensor:
        return (values.double() * weights[0]).sum((0, 1)).cpu()

    def on_heads(i):
        def hook(_module, _inputs, out):
            per_head = out.unflatten(-1, (c.num_attention_heads, c.head_dim)).norm(dim=-1)
            heads[i] += token_sum(per_head)
        return hook

    def on_units(i):
        def hook(_module, _inputs, out):
            units[i] += token_sum(out.abs())
        return hook

    def on_stream(_module, _inputs, out):
        nonlocal hidden
        hidden += token_sum((out[0] if isinstance(out, tuple) else out).abs())

    handles = [model.model.embed_out.register_forward_hook(on_stream)]
    for i, layer in enumerate(layers):
        handles += [layer.self_attn.heads_out.register_forward_hook(on_heads(i)),
                    layer.mlp.neurons.register_forward_hook(on_units(i)),
                    layer.register_forward_hook(on_stream)]
    tokens = 0.0
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(model.device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(input_ids) if mask is None else mask.to(model.device)
            weights[:] = [mask[..., None].double()]
            tokens += float(mask.sum())
            model(input_ids=input_ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration tokens: give at least one batch with real tokens")
    group = c.num_attention_heads // c.num_key_value_heads
    return DecoderImportance(
        queries=[(h / tokens).float().view(c.num_key_value_heads, group) for h in heads],
        units=[(u / tokens).float() for u in units],
        hidden=(hidden / (tokens * (len(layers) + 1))).float(),
    )


def rewire(model: DecoderModel, batches, orders: dict | None = None) -> DecoderImportance:
    """Sort every layer's KV groups, the query heads inside each group, the MLP neurons and the
    hidden channels by decreasing importance (in place), so that prefix sub-networks keep the
    most important units. Returns the importances in the new order; `orders`, when given,
    receives the hidden channels' permutation under "hidden" (new channel j = old channel
    orders["hidden"][j])."""
    scores = importance(model, batches)
    kv_order = [torch.argsort(g, descending=True, stable=True) for g in scores.groups]
    query_order = [torch.argsort(q, dim=1, descending=True, stable=True) for q in scores.queries]
    unit_order = [torch.argsort(u, descending=True, stable=True) for u in scores.units]
    hidden_order = torch.argsort(scores.hidden, descending=True, stable=True)
    reorder(model, kv_order, query_order, unit_order, hidden_order)
    if orders is not None:
        orders["hidden"] = hidden_order.tolist()
    return DecoderImportance(
        queries=[q.gather(1, qo)[ko] for q, qo, ko in
                 zip(scores.queries, query_order, kv_order, strict=True)],
        units=[u[o] for u, o in zip(scores.units, unit_order, strict=True)],
        hidden=scores.hidden[hidden_order],
    )


@torch.no_grad()
def reorder(model: DecoderModel, kv_order, query_order, unit_order,
            hidden_order: torch.Tensor) -> None:
    """Permute the units of a full decoder in place (new unit j = old unit order[j]); it
    computes the same function afterwards.

    Args:
        model: a full supernet (not an extracted sub-network).
        kv_order: per layer, the order of the KV groups; each group moves with its query heads.
        query_order: per layer, (groups, queries per group): the order inside each *old* group.
        unit_order: per layer, the order of the MLP neurons (gate, up and down together).
        hidden_order: the order of the residual-stream channels, applied to the embeddings,
            every tensor that reads or writes the stream, the norms and the head (the LM head
            or `score`: every parameter outside `model.`; RMSNorm's mean over all channels
            does not depend on their order).
    """
    c, d = model.config, model.config.head_dim
    if any(x is not None for x in (c.layer_kv_heads, c.layer_queries_per_kv, c.layer_units)):
        raise ValueError("reorder applies to a full supernet, not an exported sub-network")
    device = model.model.embed_tokens.weight.device

    def permute(param: torch.Tensor | None, dim: int, order: torch.Tensor) -> None:
        if param is not None:
            param.copy_(param.index_select(dim, order.to(device)))

    ho = hidden_order.long()
    permute(model.model.embed_tokens.weight, 1, ho)  # a tied LM head moves with it
    permute(model.model.norm.weight, 0, ho)
    for name, param in model.named_parameters():
        if not name.startswith("model."):  # lm_head.weight or score.weight: (out, hidden)
            permute(param, 1, ho)
    for layer, kv_o, q_o, u_o in zip(model.model.layers, kv_order, query_order, unit_order,
                                     strict=True):
        kv_o, q_o, u_o = kv_o.long(), q_o.long(), u_o.long()
        heads = (kv_o[:, None] * c.queries_per_group + q_o[kv_o]).flatten()
        rows = (heads[:, None] * d + torch.arange(d)).flatten()
        kv_rows = (kv_o[:, None] * d + torch.arange(d)).flatten()
        att, mlp = layer.self_attn, layer.mlp
        for linear, order in ((att.q_proj, rows), (att.k_proj, kv_rows), (att.v_proj, kv_rows),
                              (mlp.gate_proj, u_o), (mlp.up_proj, u_o)):
            permute(linear.weight, 0, order)
            permute(linear.bias, 0, order)
            permute(linear.weight, 1, ho)
        permute(att.o_proj.weight, 1, rows)
        permute(mlp.down_proj.weight, 1, u_o)
        for param in (att.o_proj.weight, att.o_proj.bias, mlp.down_proj.weight,
                      mlp.down_proj.bias, layer.input_layernorm.weight,
                      layer.post_attention_layernorm.weight):
            permute(param, 0, ho)
    model.reset_super_network()
