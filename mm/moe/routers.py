"""MoE routers: how each chosen decoder layer's FFN is routed, registered with their own options.

A router's builder ``(moe, layer, layout, key, width, options)`` puts experts under ``moe.ffn_experts[key]``
(and any router weights under ``moe.router[key]``) and gives the layer's FFN modules a routed forward. Registry
extras: ``check(moe_config, layout)`` refuses a combination up front with one line; ``aux_loss_coef`` in the
options makes the router's balance loss an auxiliary loss of training.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from mm.errors import MMError
from mm.moe.routed import ModalityForward, TopKForward
from mm.registry import NoOptions, Registry

ROUTERS = Registry("router")


@ROUTERS.register("modality", options=NoOptions)
def attach_modality(moe, layer: nn.Module, layout, key: str, width: int, options: NoOptions) -> None:
    """Static routing by modality (Mono-InternVL): image tokens -> a visual copy of the FFN, text -> the LLM's own.
    A family whose FFN is several modules with parameter-free ops between them (OPT's fc1/fc2) routes each."""
    modules = {n: getattr(layer, n) for n in layout.ffn}
    if layout.ffn_is_one_module:
        (module,) = modules.values()
        expert = moe.ffn_experts[key] = copy.deepcopy(module)
        module.forward = ModalityForward(module, expert, moe, f"moe.ffn_experts.{key}")
        return
    group = moe.ffn_experts[key] = nn.ModuleDict({n: copy.deepcopy(m) for n, m in modules.items()})
    for n, module in modules.items():
        module.forward = ModalityForward(module, group[n], moe, f"moe.ffn_experts.{key}.{n}")


@dataclass
class TopKOptions:
    num_experts: int = 4  # experts per layer, each upcycled from the FFN
    top_k: int = 2  # experts per token
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss


def check_topk(config, layout) -> None:
    options = config.router.options
    if not config.ffn_experts:
        raise MMError("moe.router=topk routes FFN experts: set ffn_experts=true")
    if options.num_experts < 1:
        raise MMError(f"moe.router.num_experts must be a positive integer, got {options.num_experts!r}")
    if not 1 <= options.top_k <= options.num_experts:
        raise MMError(f"moe.router.top_k must be an integer from 1 to num_experts={options.num_experts}, "
                      f"got {options.top_k!r}")
    if layout is not None and not layout.ffn_is_one_module:
        raise MMError(f"moe.router=topk: the {layout.family} FFN is {'/'.join(layout.ffn)} on the decoder layer, "
                      "not one module that can be upcycled into experts; use router=modality")


@ROUTERS.register("topk", options=TopKOptions, check=check_topk,
                  example=lambda workdir: {"name": "topk", "num_experts": 2, "top_k": 1})
def attach_topk(moe, layer: nn.Module, layout, key: str, width: int, options: TopKOptions) -> None:
    """MoE-LLaVA sparse upcycling: ``num_experts`` FFN copies and a learned linear router; every token goes to its
    ``top_k`` experts (the LLM's own FFN is not used)."""
    mlp = getattr(layer, layout.ffn[0])
    experts = moe.ffn_experts[key] = nn.ModuleList(copy.deepcopy(mlp) for _ in range(options.num_experts))
    router = moe.router[key] = nn.Linear(width, options.num_experts, bias=False)
    nn.init.normal_(router.weight, std=0.02)
    mlp.forward = TopKForward(router, experts, moe, options.top_k, f"moe.ffn_experts.{key}")
