"""Packed rows without a T x T mask: for every registered LLM family, a packed row's logits equal each document
run alone through the training forward; the attention path is chosen per LLM and device and stated; an LLM
whose attention cannot keep documents apart is refused. Guards show each check fails on leaking attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mm
from mm.config import load_config
from mm.data.pack import collate_packed, collate_rows
from mm.data.render import Item, Renderer
from mm.errors import MMError
from mm.llm.attention import (
    DENSE_MEAN_DOCUMENT,
    PACKED_SDPA,
    document_lengths,
    document_mask,
    packed_sdpa,
    use_packed_attention,
)
from mm.parts import registry
from mm.train import TrainConfig
from mm.train.losses import LMLoss
from mm.train.losses.forward import hidden_states, label_positions, logits_at

DOCS = [
    ({"kind": "interleaved", "content": [{"type": "image"}, {"type": "text", "text": "two red circles on the left "
                                                                             "and a blue square at the top."}]},
     [Image.new("RGB", (40, 30), (200, 0, 0))]),
    ({"kind": "interleaved", "content": [{"type": "text", "text": "text first: a page about shapes, then"},
                                         {"type": "image"}, {"type": "text", "text": "a green triangle."}]},
     [Image.new("RGB", (24, 24), (0, 90, 200))]),
    ({"kind": "chat", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what color are the shapes in this picture?"}]},
        {"role": "assistant", "content": "they are blue and green, with one yellow star."}]}, []),
    ({"kind": "interleaved", "content": [{"type": "image"}, {"type": "text", "text": "the word cat."},
                                         {"type": "image"}, {"type": "text", "text": "the word dog."}]},
     [Image.new("RGB", (20, 50), (0, 200, 0)), Image.new("RGB", (30, 30), (9, 9, 9))]),
]


def items(model) -> list[Item]:
    renderer = Renderer.from_model(model, 512)
    return [Item(f"d{i}", [renderer.render_lm(doc)], images) for i, (doc, images) in enumerate(DOCS)]


def training_hidden(model, batch) -> torch.Tensor:
    """Final hidden states ``[B, T, D]`` through the training forward (which chooses the packed attention path)."""
    return hidden_states(model, batch)


def transformers_hidden(model, batch) -> torch.Tensor:
    """``[B, T, D]`` straight through the transformers decoder with the LLM's own attention (no path chosen)."""
    embeddings = model.embed(batch["input_ids"], batch.get("pixel_values"))
    return model.llm.get_decoder()(inputs_embeds=embeddings, attention_mask=batch.get("attention_mask"),
                                   position_ids=batch["position_ids"], use_cache=False).last_hidden_state


def packed_vs_alone(model, hidden=training_hidden) -> float:
    """Largest difference between the LM logits of the documents of a packed row (two rows: the documents, and
    the same documents in another order with padding) and those of each document alone, at every position that
    predicts a labelled token (the LM head is per position, so these are the logits every loss reads)."""
    docs = items(model)
    pad, transform = model.tokenizer.pad_token_id, model.encoder.transform
    rows = [docs, docs[::-1][:2]]
    batch = collate_packed(rows, pad, transform)
    assert "attention_mask" not in batch  # no [B, 1, T, T] mask travels with packed rows
    worst = 0.0
    with torch.no_grad():
        packed = hidden(model, batch)  # [2, T, D]
        for b, row in enumerate(rows):
            at = 0
            for item in row:
                n = len(item.rows[0])
                single = collate_rows([item], pad, transform)
                where = label_positions(single["labels"])[0]  # [n]
                alone = logits_at(model, hidden(model, single), where[None])  # [N, V]
                ours = logits_at(model, packed[b: b + 1, at: at + n], where[None])
                worst = max(worst, float((ours - alone).abs().max()))
                at += n
    return worst


def llm_examples(workdir) -> list[tuple[str, dict]]:
    found = []
    for name in registry("llm").names():
        section = registry("llm").entry(name).example(workdir)
        if section is not None:
            found.append((name, section))
    return found


def test_every_llm_family_packed_row_equals_each_document_alone(tmp_path):
    failures, paths = {}, {}
    for name, section in llm_examples(tmp_path):
        torch.manual_seed(0)
        model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm=section))
        try:
            worst = packed_vs_alone(model)
        except Exception as exc:  # noqa: BLE001  (report every family)
            failures[name] = f"{type(exc).__name__}: {exc}"
            continue
        paths[name] = model.llm.config._attn_implementation
        if worst > 1e-4:
            failures[name] = f"packed logits differ from alone by {worst:.3g} ({paths[name]})"
    assert not failures, failures
    assert set(paths.values()) == {PACKED_SDPA}, paths  # on CPU every family supporting SDPA runs it per document


def test_the_family_check_fails_when_documents_see_each_other():
    """Guard: OPT builds its causal mask without positions, so its own SDPA given packed positions lets documents
    attend across the boundary; the comparison above catches that."""
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-opt"))
    assert model.llm.config._attn_implementation == "sdpa"
    assert packed_vs_alone(model, transformers_hidden) > 1e-2


def test_packed_loss_and_gradients_equal_the_documents_alone():
    """The training step itself: LM loss and gradients of a packed row equal those of its documents alone (a
    document starting with a labelled text token is no target of the document before it), with activation
    checkpointing too."""
    from mm.train.build import checkpoint_layers

    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-qwen2"))
    model.requires_grad_(True)
    docs = items(model)
    pad, transform = model.tokenizer.pad_token_id, model.encoder.transform

    def grads(batches):
        model.zero_grad()
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss = sum(LMLoss()(model, b)[0] * int((b["labels"][:, 1:] != -100).sum()) / total for b in batches)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_loss, packed = grads([collate_packed([docs], pad, transform)])
    alone_loss, alone = grads([collate_rows([item], pad, transform) for item in docs])
    assert checkpoint_layers(model.llm)  # trainer.gradient_checkpointing: the layers recomputed in backward
    recomputed_loss, recomputed = grads([collate_packed([docs], pad, transform)])
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recomputed_loss, packed_loss, rtol=1e-6, atol=1e-7)
    assert packed.keys() == alone.keys() == recomputed.keys()
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(recomputed[name], packed[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_per_document_paths_match_a_dense_document_mask():
    """``mm_packed_sdpa``'s three paths (per document, dense for tiny documents, sliding windows), forward and
    backward, against SDPA with the explicit block-diagonal mask."""
    torch.manual_seed(0)
    llm = mm.build(mm.ModelConfig(llm="tiny-mistral")).llm  # GQA: 4 query heads, 2 key/value heads
    attention = llm.model.layers[0].self_attn
    cases = [([[40, 30, 26], [96]], None), ([[4] * 24], None), ([[60, 36], [50, 46]], 16), ([[96]], 16)]
    for rows, window in cases:
        T = sum(rows[0])
        positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])  # [B, T]
        assert document_lengths(positions, len(rows), T) == rows
        q = torch.randn(len(rows), 4, T, 16, requires_grad=True)
        k, v = (torch.randn(len(rows), 2, T, 16, requires_grad=True) for _ in range(2))
        ours, _ = packed_sdpa(attention, q, k, v, None, scaling=0.25, sliding_window=window, position_ids=positions)
        mask = document_mask(rows, T, window, "cpu")  # [B, 1, T, T]
        expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                  attn_mask=mask, scale=0.25).transpose(1, 2)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        grad = torch.randn_like(ours)
        mine = torch.autograd.grad(ours, (q, k, v), grad)
        theirs = torch.autograd.grad(expected, (q, k, v), grad)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert 4 < DENSE_MEAN_DOCUMENT <= 26  # the cases above reach both the dense and the per-document path


def test_unpacked_padded_and_cached_forwards_are_unchanged():
    """The chosen path leaves everything that is not a packed row to transformers' SDPA: padded batches, and
    KV-cache generation (Mistral's sliding window included)."""
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-mistral"))
    ids = torch.randint(3, 500, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        before = model.llm(input_ids=ids, attention_mask=mask).logits
        assert use_packed_attention(model.llm).startswith(f"attention: {PACKED_SDPA} ")
        after = model.llm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    image = Image.new("RGB", (40, 30), (200, 40, 90))
    options = dict(images=[image], prompt="hi", max_new_tokens=5)
    assert model.generate(use_cache=True, **options) == model.generate(use_cache=False, **options)


def test_an_eager_llm_keeps_documents_apart_without_the_old_mask():
    """Gemma-2 runs eager (attention softcapping): the old dense bool mask is added to its scores as 0/1 and blocks
    nothing; given positions only, transformers derives a real document mask, which the probe accepts."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)).eval()
    ids = torch.randint(1, 128, (2, 44))
    ids[1, 24:] = ids[0, 24:]  # the same second document after two different first ones
    positions = torch.cat([torch.arange(24), torch.arange(20)]).expand(2, -1)
    old = torch.zeros(44, 44, dtype=torch.bool)
    old[:24, :24] = old[24:, 24:] = True
    old = (old & torch.ones(44, 44, dtype=torch.bool).tril()).expand(2, 1, 44, 44)
    with torch.no_grad():
        leaky = llm(input_ids=ids, attention_mask=old, position_ids=positions, use_cache=False).logits
        assert float((leaky[0, 24:] - leaky[1, 24:]).abs().max()) > 1e-2  # the bug: one document moves another
        line = use_packed_attention(llm)
        assert line.startswith("attention: eager ") and "position_ids" in line
        kept = llm(input_ids=ids, position_ids=positions, use_cache=False).logits
        alone = llm(input_ids=ids[:1, 24:], use_cache=False).logits[0]
    torch.testing.assert_close(kept[0, 24:], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kept[1, 24:], alone, rtol=1e-4, atol=1e-5)


def test_an_llm_that_cannot_keep_documents_apart_is_refused(tmp_path):
    """BLOOM takes positions (ALiBi) and its mask from ``attention_mask`` only: packed training is refused with
    one line, at train start and on the first packed batch of a model built without it."""
    from transformers import BloomConfig, BloomForCausalLM

    from mm.llm.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4)).save_pretrained(
        tmp_path / "bloom")
    tokenizer.save_pretrained(tmp_path / "bloom")
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm=f"hf:{tmp_path / 'bloom'}"))
    with pytest.raises(MMError) as refused:
        use_packed_attention(model.llm)
    message = str(refused.value)
    assert "\n" not in message and "BloomForCausalLM" in message and "data.pack=false" in message
    with pytest.raises(MMError, match="keeps documents apart"):
        hidden_states(model, collate_packed([items(model)], model.tokenizer.pad_token_id, model.encoder.transform))


def test_train_start_states_the_path_once(capsys, tiny_model_dir):
    from mm.train.build import build_student, choose_attention

    config = load_config(TrainConfig, [], [f"init_from={tiny_model_dir}", "stage.trainable=['adapter.*']",
                                           "output_dir=unused"])
    model = build_student(config)
    choose_attention(config, model)
    assert capsys.readouterr().out == f"attention: {PACKED_SDPA} (SDPA per document, no T x T mask; " \
                                      "LlamaForCausalLM on cpu)\n"
    with torch.no_grad():  # chosen already: the first packed batch states nothing more
        hidden_states(model, collate_packed([items(model)], model.tokenizer.pad_token_id, model.encoder.transform))
    assert capsys.readouterr().out == ""
    config.data.pack = False
    fresh = build_student(config)
    choose_attention(config, fresh)
    assert capsys.readouterr().out == "" and fresh.llm.config._attn_implementation == "sdpa"


def test_the_packing_benchmark_runs_its_tiny_step():
    """``tools.bench.packing`` at its tiny size: the three variants ran through the chosen path and every figure
    the aggregate reads is there (timing claims are the benchmark's, never asserted here)."""
    from tools.bench import aggregate, packing

    result = packing.run(tiny=True)
    assert result["attention"].startswith(f"attention: {PACKED_SDPA} ") and result["documents"] == 4
    for figure in ("long_packed_step_ratio", "packed_mask_memory_ratio"):
        assert aggregate.FIGURES[figure][1] == f"packing:{figure}" and result[figure] > 0
    assert min(result[f"{name}_step_s"] for name in ("packed", "causal", "dense")) > 0


def test_modality_experts_and_lora_keep_documents_apart():
    """Experts (FFN and attention projections, routed by the packed row's image tokens) and LoRA wrap projections,
    never the attention itself: the packed row still equals its documents alone."""
    from mm.train.build import apply_lora

    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama",
                                    moe=mm.MoEConfig(ffn_experts=True, attn_experts=True)))
    apply_lora(model, load_config(TrainConfig, [], ["output_dir=unused", "lora.enabled=true"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "moe." in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)  # experts and LoRA that change the output
    assert packed_vs_alone(model) < 1e-4
    assert model.llm.get_base_model().config._attn_implementation == PACKED_SDPA
