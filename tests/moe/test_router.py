"""The learned top-k router (MoE-LLaVA style) and its load-balancing loss; token dispatch counts."""
from __future__ import annotations

import torch

import mm
from mm.moe import balance_loss
from tests.moe.conftest import build, mixed_batch

TOPK = mm.MoEConfig(router={"name": "topk", "num_experts": 4, "top_k": 2, "aux_loss_coef": 0.01})


def test_balance_loss_is_one_at_uniform_routing_and_num_experts_when_collapsed():
    tokens, experts = 64, 4
    uniform = torch.full((tokens, experts), 1 / experts)
    assigned = torch.arange(tokens * 2).reshape(tokens, 2) % experts  # every expert equally often
    assert torch.isclose(balance_loss(uniform, assigned), torch.tensor(1.0))
    collapsed = torch.zeros(tokens, experts)
    collapsed[:, 0] = 1
    assert torch.isclose(balance_loss(collapsed, torch.zeros(tokens, 1, dtype=torch.long)), torch.tensor(4.0))
    # skewing the router toward the expert that gets the tokens raises the loss monotonically from 1
    onehot = torch.zeros(tokens, dtype=torch.long)
    values = [float(balance_loss((1 - a) * uniform + a * collapsed, onehot[:, None])) for a in (0, 0.25, 0.5, 1)]
    assert values[0] == 1.0 and values == sorted(values) and values[-1] == 4.0


def test_upcycled_topk_model_matches_the_plain_llm_and_reports_its_aux_loss():
    plain = build()
    model = build(moe=TOPK)
    batch = mixed_batch(model)
    with torch.no_grad():
        expected = plain(**batch).logits
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # renormalised gates of identical copies
    assert len(model.moe._balance) == 2  # one term per routed layer of the last forward
    assert 0 < float(model.moe.balance_loss()) <= TOPK.router.options.num_experts
    torch.testing.assert_close(model.moe.aux_loss(), 0.01 * model.moe.balance_loss())
    with torch.no_grad():
        for router in model.moe.router.values():
            router.weight.zero_()  # uniform routing
        model(**batch)
    torch.testing.assert_close(model.moe.balance_loss(), torch.tensor(1.0))


def test_aux_loss_trains_the_router_and_is_absent_for_modality_routing():
    model = build(moe=TOPK)
    batch = mixed_batch(model)
    model(**batch).logits.sum().mul(0).add(model.moe.aux_loss()).backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in model.moe.router.values())
    static = build(moe=mm.MoEConfig())
    static(**mixed_batch(static))
    assert static.moe.aux_loss() is None  # nothing to balance: the loop adds no moe_aux


def _count_rows(modules):
    counts = [0] * len(modules)
    handles = [m.register_forward_hook(lambda mod, args, out, i=i: counts.__setitem__(i, counts[i] + args[0].shape[0]
                                                                                       if args[0].ndim == 2 else
                                                                                       counts[i] + args[0].shape[0] *
                                                                                       args[0].shape[1]))
               for i, m in enumerate(modules)]
    return counts, handles


def test_each_token_passes_through_one_ffn_only():
    model = build(moe=mm.MoEConfig(layers=[0]))
    batch = mixed_batch(model)
    mlp = model.llm.model.layers[0].mlp  # its own forward runs on the text rows only; its children show how many
    counts, handles = _count_rows([model.moe.ffn_experts["0"], mlp.down_proj])
    with torch.no_grad():
        model(**batch)
    images = int((batch["input_ids"] == model.image_token_id).sum())
    assert counts == [images, batch["input_ids"].numel() - images]
    for h in handles:
        h.remove()


def test_topk_sends_each_token_to_exactly_k_experts():
    model = build(moe=TOPK)
    batch = mixed_batch(model)
    counts, _ = _count_rows(list(model.moe.ffn_experts["0"]))
    text_counts, _ = _count_rows([model.llm.model.layers[0].mlp.down_proj])
    with torch.no_grad():
        model(**batch)
    assert sum(counts) == batch["input_ids"].numel() * TOPK.router.options.top_k
    assert text_counts == [0]
