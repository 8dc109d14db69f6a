"""klops.integrations.hf against Hugging Face causal LMs built from configs in code: the fused-linear ops on
lm_head(model) and last_hidden_states(model) give the model's own logits' losses and gradients (every parameter,
tied embeddings included), for a soft-capped Gemma-2, a scaled Cohere, a Granite dividing by logits_scaling, a
PEFT-wrapped model and an FSDP2-sharded head."""

import pytest
import torch

import klops
from klops.integrations import hf

transformers = pytest.importorskip("transformers")

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)  # fmt: skip
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "llama-tied": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True),
    "gemma2-softcap": lambda: transformers.Gemma2Config(
        **SMALL, final_logit_softcapping=3.0, attn_implementation="eager"
    ),  # fmt: skip
    "cohere-scale": lambda: transformers.CohereConfig(**SMALL, logit_scale=0.37),
    "granite-scaling": lambda: transformers.GraniteConfig(**SMALL, logits_scaling=3.0),
}
TOL = dict(rtol=1e-4, atol=1e-5)


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():  # larger logits than the init's, so that a missing scale or cap shows
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def both_losses(model, ids, labels):
    """(klops's cross-entropy and its gradients, the model's own logits' cross-entropy and its gradients)."""
    model.zero_grad()
    head = hf.lm_head(model)
    hidden = hf.last_hidden_states(model, input_ids=ids)
    ours = klops.fused_linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], **head.kwargs())
    ours.backward()
    ours_grads = grads(model)
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1]
    theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1))
    theirs.backward()
    return ours, ours_grads, theirs, grads(model)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_losses_equal_the_models_logits(name):
    model = tiny(name)
    ids, labels = batch()
    ours, ours_grads, theirs, their_grads = both_losses(model, ids, labels)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert ours_grads.keys() == their_grads.keys() and len(ours_grads) == len(list(model.parameters()))
    for key, grad in their_grads.items():
        torch.testing.assert_close(ours_grads[key], grad, **TOL, msg=lambda m, key=key: f"{key}: {m}")
    head = hf.lm_head(model)
    with torch.no_grad():  # the per-token log-probs too; and the head's reading is needed: without it, they differ
        logp = klops.fused_linear_logprobs(hf.last_hidden_states(model, input_ids=ids), head.weight, ids,
                                           **head.kwargs())  # fmt: skip
        want = torch.log_softmax(model(input_ids=ids).logits, -1).gather(-1, ids[..., None]).squeeze(-1)
        torch.testing.assert_close(logp, want, **TOL)
        if name not in ("llama", "llama-tied"):
            plain = klops.fused_linear_logprobs(hf.last_hidden_states(model, input_ids=ids), head.weight, ids)
            assert not torch.allclose(plain, want, **TOL)
    if name == "llama-tied":
        assert head.weight is model.get_input_embeddings().weight


def test_config_fields():
    assert hf.logit_scale(transformers.CohereConfig(logit_scale=0.25)) == 0.25
    assert hf.logit_scale(transformers.GraniteConfig(logits_scaling=4.0)) == 0.25
    assert hf.logit_scale(transformers.LlamaConfig()) == 1.0
    config = transformers.LlamaConfig()
    config.lm_head_multiplier = 0.5  # Falcon-H1's field
    assert hf.logit_scale(config) == 0.5
    head = hf.lm_head(tiny("gemma2-softcap"))
    assert head.softcap == 3.0 and head.logit_scale == 1.0 and head.bias is None
    assert head.teacher_kwargs() == {"teacher_bias": None, "teacher_softcap": 3.0, "teacher_logit_scale": 1.0}
    with pytest.raises(ValueError, match="output embedding is a plain torch.nn.Linear"):
        hf.lm_head(torch.nn.Linear(3, 4))


def test_distillation_between_two_families():
    """fused_linear_kl with a scaled Cohere student and a soft-capped Gemma-2 teacher, each head read by lm_head,
    against the KL of the two models' own logits."""
    student, teacher = tiny("cohere-scale"), tiny("gemma2-softcap")
    ids, labels = batch()
    s_head, t_head = hf.lm_head(student), hf.lm_head(teacher)
    with torch.no_grad():
        t_hidden = hf.last_hidden_states(teacher, input_ids=ids)
        t_logits = teacher(input_ids=ids).logits
    s_hidden = hf.last_hidden_states(student, input_ids=ids)
    ours = klops.fused_linear_kl(s_hidden, s_head.weight, t_hidden, t_head.weight, labels=labels,
                                 **s_head.student_kwargs(), **t_head.teacher_kwargs())  # fmt: skip
    want = klops.reference.fused_kl_reference(student(input_ids=ids).logits, t_logits, labels=labels)
    torch.testing.assert_close(ours.double(), want, **TOL)


def test_peft_model():
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids, labels = batch()
    ours, ours_grads, theirs, their_grads = both_losses(lora, ids, labels)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert any("lora_A" in key for key in ours_grads) and ours_grads.keys() == their_grads.keys()
    for key, grad in their_grads.items():
        torch.testing.assert_close(ours_grads[key], grad, **TOL)
    on_head = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="LoRA adapter on the LM head"):
        hf.lm_head(on_head)


def _fsdp2_rank(rank: int, store: str) -> None:
    """One of two gloo ranks: FSDP2 shards the head (the backbone is called directly: the module docstring)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        reference, model = tiny("llama"), tiny("llama")
        fully_shard(model.lm_head)
        assert isinstance(model.lm_head.weight, DTensor) and model.lm_head.weight.to_local().shape[0] < V
        ids, labels = batch()
        hidden = hf.last_hidden_states(model, input_ids=ids)
        with CommDebugMode() as comm:
            head = hf.lm_head(model)
            loss = klops.fused_linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], **head.kwargs())
        assert not isinstance(head.weight, DTensor)
        gathers = sum(n for op, n in comm.get_comm_counts().items() if "all_gather" in str(op))
        assert gathers == 1, comm.get_comm_counts()
        loss.backward()
        want, want_grads, _, _ = both_losses(reference, ids, labels)
        torch.testing.assert_close(loss, want, **TOL)
        torch.testing.assert_close(model.lm_head.weight.grad.full_tensor(), want_grads["lm_head.weight"], **TOL)
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_head_gathered_once(tmp_path):
    """A head that FSDP2 shards over two gloo ranks (a DTensor): lm_head gathers it once, whatever the number of
    chunks the op runs, and the loss and the head's gradient equal the unsharded model's."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torch.multiprocessing.spawn(_fsdp2_rank, args=(str(tmp_path / "store"),), nprocs=2)
