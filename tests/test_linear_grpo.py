"""fused_linear_grpo_loss with the gradient in its forward (klops/linear_grpo.py) against the recomputing path it
replaces where it applies and against the float64 reference; the cases it leaves to that path; its products."""

import pytest
import torch

import klops
from klops import _chunked, linear_grpo
from klops.reference import grpo_loss_reference, logprobs_reference

from .conftest import DEVICE, GRAD_TOL, assert_close, backends_of, randn

CPU_BACKENDS = [b for b in backends_of("linear") if b in ("cpu", "torch")]
# every loss type whose sequences are independent: the path takes them all
INDEPENDENT_TYPES = [t for t in klops.grpo.LOSS_TYPES if t not in linear_grpo.BATCH_COUPLED_TYPES]
NEEDS = {"dro": dict(dro_beta=0.5)}
B, L, V, D = 6, 4, 37, 12
PARAMS = ("hidden", "weight", "bias")


@pytest.fixture
def two_sequence_chunks(monkeypatch):
    """Chunks of 8 rows: 2 sequences of L = 4 per chunk, 3 chunks for B = 6."""
    monkeypatch.setitem(_chunked.LINEAR_MIN_ROWS, DEVICE.type, 8)
    monkeypatch.setitem(_chunked.LINEAR_CHUNK_ELEMENTS, DEVICE.type, 1)


def head_inputs(gen, B=B, L=L, dtype=torch.float32):
    """hidden [B, L, D], weight [V, D], bias [V], ids, advantages [B] (one 0), a mask with padding, a late start and
    a fully masked sequence, and old / ref / rollout log-probs near the policy's so that ratios cross the clip
    bounds."""
    hidden, weight = randn(B, L, D, gen=gen, dtype=dtype), randn(V, D, gen=gen, dtype=dtype, scale=0.5)
    bias = randn(V, gen=gen, dtype=dtype)
    ids = torch.randint(0, V, (B, L), generator=gen).to(DEVICE)
    mask = torch.ones(B, L, device=DEVICE)
    mask[0, 3:], mask[2], mask[B - 2, :1] = 0, 0, 0
    advantages = randn(B, gen=gen)
    advantages[1] = 0.0
    logp = logprobs_reference(torch.nn.functional.linear(hidden, weight, bias), ids)[0].float()
    old = (logp + 0.3 * randn(B, L, gen=gen)).clamp(max=-1e-3)  # DPPO reads exp(old_logp) as a probability
    ref, rollout = logp + 0.5 * randn(B, L, gen=gen), old + 0.2 * randn(B, L, gen=gen)
    return dict(hidden=hidden, weight=weight, bias=bias, completion_ids=ids, advantages=advantages, mask=mask,
                old_logp=old, ref_logp=ref, rollout_logp=rollout)  # fmt: skip


def run(inputs, gradient_in_forward: bool, grad_output=1.0, **kw):
    """(loss, grads of hidden / weight / bias, metrics, whether the new path was taken) of fused_linear_grpo_loss,
    the new path switched off unless ``gradient_in_forward``."""
    params = {name: inputs[name].detach().requires_grad_() for name in PARAMS}  # strides kept
    taken = []
    decide = linear_grpo.takes_gradient_in_forward

    def spy(*args):
        taken.append(gradient_in_forward and decide(*args))
        return taken[-1]

    linear_grpo.takes_gradient_in_forward = spy
    try:
        rest = {k: v for k, v in inputs.items() if k not in PARAMS}
        loss, metrics = klops.fused_linear_grpo_loss(params["hidden"], params["weight"], bias=params["bias"], **rest,
                                                     **kw)  # fmt: skip
    finally:
        linear_grpo.takes_gradient_in_forward = decide
    (loss * grad_output).backward()
    return loss, [params[name].grad for name in PARAMS], metrics, taken == [True]


def reference(inputs, grad_output=1.0, temperature=1.0, softcap=None, logit_scale=1.0, ref_model=None, backend=None,
              **kw):  # fmt: skip
    """(loss, grads of hidden / weight / bias) in float64: the logits formed in full, logprobs_reference and
    grpo_loss_reference; ``ref_model`` (hidden, weight, bias) gives ref_logp; ``backend`` is not read."""
    params = [inputs[name].double().requires_grad_() for name in PARAMS]
    mask = inputs["mask"]
    labels = torch.where(mask != 0, inputs["completion_ids"], -100)

    def logits(hidden, weight, bias):
        z = logit_scale * torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    logp, entropy = logprobs_reference(logits(*params), labels, temperature=temperature)
    rest = {k: v for k, v in inputs.items() if k in ("old_logp", "ref_logp", "rollout_logp")}
    if ref_model is not None:
        rest["ref_logp"] = logprobs_reference(logits(*ref_model), labels, temperature=temperature)[0]
    loss = grpo_loss_reference(logp, inputs["advantages"], mask, entropy=entropy, **rest, **kw)
    (loss * grad_output).backward()
    return loss, [p.grad for p in params]


def check(inputs, grad_output=1.0, grad_tol=GRAD_TOL[torch.float32], **kw):
    """The new path is taken, and equals the recomputing path (loss, gradients, metrics) and the float64
    reference."""
    loss, grads, metrics, taken = run(inputs, True, grad_output, **kw)
    assert taken, "the gradient-in-forward path was not taken"
    old_loss, old_grads, old_metrics, _ = run(inputs, False, grad_output, **kw)
    assert_close(loss, old_loss, (1e-6, 0), "loss vs recomputing path")
    for name, ours, theirs in zip(PARAMS, grads, old_grads):
        assert ours.dtype == theirs.dtype, name
        assert_close(ours, theirs, (1e-5, 1e-6), f"{name} grad vs recomputing path")
    assert metrics.keys() == old_metrics.keys()
    for name in metrics:
        assert not metrics[name].requires_grad
        assert_close(metrics[name], old_metrics[name], (1e-6, 0), f"metric {name}", floor=1e-9)
    want, want_grads = reference(inputs, grad_output, **kw)
    # the fp32 log-probs' rounding (a few 1e-7) where the loss is a small sum of terms of either sign
    assert_close(loss, want, (1e-5, 1e-6), "loss vs float64", floor=1e-6)
    for name, ours, theirs in zip(PARAMS, grads, want_grads):
        assert_close(ours, theirs, grad_tol, f"{name} grad vs float64", floor=1e-8)


@pytest.mark.parametrize("with_old", [True, False], ids=["old_logp", "on_policy"])
@pytest.mark.parametrize("loss_type", INDEPENDENT_TYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_types(loss_type, with_old, backend, gen, two_sequence_chunks):
    """Every independent loss type in chunks of two sequences, with bias, T != 1, beta > 0 (ref_logp), an entropy
    bonus, a sequence-level rollout correction (token-level for vespo), and an upstream gradient != 1."""
    inputs = head_inputs(gen)
    if not with_old:
        del inputs["old_logp"]
    rollout = "token_mask" if loss_type == "vespo" else "sequence_mask"
    kw = dict(loss_type=loss_type, beta=0.04, entropy_coef=0.05, temperature=0.8, epsilon_high=0.28,
              rollout_correction=rollout, rollout_clip_max=1.2, backend=backend) | NEEDS.get(loss_type, {})  # fmt: skip
    check(inputs, grad_output=1.7, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reference_model_softcap_and_logit_scale(backend, gen, two_sequence_chunks):
    """The reference model's hidden states (swept first, no gradient) with beta > 0, under a soft cap, a logit scale
    and T != 1."""
    inputs = head_inputs(gen)
    del inputs["ref_logp"], inputs["rollout_logp"]
    ref_model = (randn(B, L, D, gen=gen), inputs["weight"] + 0.1 * randn(V, D, gen=gen), randn(V, gen=gen))
    kw = dict(loss_type="grpo", beta=0.1, kl_estimator="k2", softcap=3.0, logit_scale=0.7, temperature=1.3,
              backend=backend)  # fmt: skip
    model = dict(ref_hidden=ref_model[0], ref_weight=ref_model[1], ref_bias=ref_model[2])
    loss, grads, metrics, taken = run(inputs, True, **kw, **model)
    assert taken
    old_loss, old_grads, old_metrics, _ = run(inputs, False, **kw, **model)
    want, want_grads = reference(inputs, ref_model=ref_model, **kw)
    assert_close(loss, old_loss, (1e-6, 0), "loss vs recomputing path")
    assert_close(loss, want, (1e-5, 1e-6), "loss vs float64")
    assert_close(metrics["kl"], old_metrics["kl"], (1e-6, 0), "kl metric")
    for name, ours, theirs, exact in zip(PARAMS, grads, want_grads, old_grads):
        assert_close(ours, exact, (1e-5, 1e-6), f"{name} grad vs recomputing path")
        assert_close(ours, theirs, GRAD_TOL[torch.float32], f"{name} grad vs float64", floor=1e-8)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])  # a token and a sequence normalizer
def test_num_items_off_policy_mask_and_sequence_ratio(loss_type, gen, two_sequence_chunks):
    """num_items (a 0-d tensor and an int), the off-policy sequence mask and the sequence-level ratio."""
    inputs = head_inputs(gen)
    del inputs["rollout_logp"]
    for num_items in (torch.tensor(37.0, device=DEVICE), 11):
        kw = dict(loss_type=loss_type, num_items=num_items, off_policy_mask_threshold=0.05,
                  importance_sampling_level="sequence", backend=CPU_BACKENDS[0])  # fmt: skip
        check(inputs, **kw)


@pytest.mark.parametrize("rows", [4, 8, 256])
def test_chunk_sizes(rows, gen, monkeypatch):
    """One sequence per chunk, two, and the whole batch in one chunk (the CPU's default)."""
    monkeypatch.setitem(_chunked.LINEAR_MIN_ROWS, DEVICE.type, rows)
    monkeypatch.setitem(_chunked.LINEAR_CHUNK_ELEMENTS, DEVICE.type, 1)
    check(head_inputs(gen), loss_type="gspo_token", beta=0.04, backend=CPU_BACKENDS[-1])


def test_sliced_hidden_states(gen, two_sequence_chunks):
    """hidden[:, :-1] (rows that are no one (1, B L) view): chunks of one sequence each, no copy."""
    inputs = head_inputs(gen)
    inputs["hidden"] = torch.cat([inputs["hidden"], randn(B, 1, D, gen=gen)], dim=1)[:, :-1]
    check(inputs, loss_type="grpo", beta=0.04, entropy_coef=0.05, backend=CPU_BACKENDS[0])


def test_bfloat16(gen, two_sequence_chunks):
    """bf16 hidden / weight / bias: the same bf16 logits as the recomputing path, gradients in bf16."""
    inputs = head_inputs(gen, dtype=torch.bfloat16)
    kw = dict(loss_type="dapo", beta=0.04, entropy_coef=0.05, backend=CPU_BACKENDS[0])
    loss, grads, _, taken = run(inputs, True, **kw)
    assert taken
    old_loss, old_grads, _, _ = run(inputs, False, **kw)
    assert_close(loss, old_loss, (1e-5, 1e-6), "loss vs recomputing path")
    for name, ours, theirs in zip(PARAMS, grads, old_grads):
        assert ours.dtype == torch.bfloat16, name
        assert_close(ours, theirs, GRAD_TOL[torch.bfloat16], f"{name} grad vs recomputing path")


def fallbacks(gen):
    """(name, inputs, keywords) of the calls the path leaves to the recomputing one."""
    inputs = head_inputs(gen)
    del inputs["rollout_logp"]
    on_policy = {k: v for k, v in inputs.items() if k != "ref_logp"}
    ref_model = dict(ref_hidden=randn(B, L, D, gen=gen), ref_weight=randn(V, D, gen=gen, scale=0.5))
    long_sequences = head_inputs(gen, B=3, L=10)  # longer than the 8 rows of a chunk
    del long_sequences["rollout_logp"]
    return [
        ("entropy quantile", inputs, dict(top_entropy_quantile=0.5)),
        ("clip_cov", inputs, dict(loss_type="clip_cov", clip_cov_ratio=0.15, clip_cov_lb=-0.5)),
        ("kl_cov", inputs, dict(loss_type="kl_cov", kl_cov_ratio=0.15)),
        ("full KL", on_policy, dict(kl_estimator="full", beta=0.1, **ref_model)),
        ("longer than a chunk", long_sequences, {}),
    ]


@pytest.mark.parametrize("case", range(5))
def test_fallbacks_keep_the_recomputing_path(case, gen, two_sequence_chunks):
    """Losses that couple sequences and sequences longer than a chunk take the recomputing path, and still equal
    grpo_loss_from_logits on the logits formed in full."""
    name, inputs, kw = fallbacks(gen)[case]
    kw = dict(beta=0.04) | kw | dict(backend=CPU_BACKENDS[0])
    torch.manual_seed(0)  # clip_cov's random draw
    loss, grads, _, taken = run(inputs, True, **kw)
    assert not taken, f"{name}: took the gradient-in-forward path"
    params = [inputs[name].clone().requires_grad_() for name in PARAMS]
    logits = torch.nn.functional.linear(*params)
    rest = {k: v for k, v in inputs.items() if k not in PARAMS} | kw
    if "ref_hidden" in rest:
        rest["ref_logits"] = torch.nn.functional.linear(rest.pop("ref_hidden"), rest.pop("ref_weight"))
    torch.manual_seed(0)
    want = klops.grpo_loss_from_logits(logits, **rest)[0]
    want.backward()
    assert_close(loss, want, (1e-5, 1e-6), f"{name}: loss vs the logits form", floor=1e-7)
    for param, ours, theirs in zip(PARAMS, grads, params):
        assert_close(ours, theirs.grad, (1e-4, 1e-5), f"{name}: {param} grad vs the logits form", floor=1e-8)


def test_conditions(gen):
    """takes_gradient_in_forward: not under no_grad, nor with a gradient wanted of advantages, nor with a
    vocabulary shard."""
    inputs = head_inputs(gen)
    hidden = inputs["hidden"].clone().requires_grad_()
    weight, advantages, mask = inputs["weight"], inputs["advantages"], inputs["mask"]
    sample = dict(temperature=1.0, softcap=None, logit_scale=1.0, backend="auto", vocab_group=None, vocab_start=None)

    def decide(advantages=advantages, sample=sample):
        return linear_grpo.takes_gradient_in_forward(hidden, weight, None, advantages, mask, None, None, None, "k3",
                                                     sample, {})  # fmt: skip

    assert decide()
    with torch.no_grad():
        assert not decide()
    assert not decide(advantages=advantages.clone().requires_grad_())
    assert not decide(sample=sample | dict(vocab_start=0))


def test_compile_takes_the_recomputing_path(gen):
    """Under torch.compile(fullgraph=True) the loss traces as one graph (the recomputing path's custom ops) and
    gives the eager gradient."""
    torch._dynamo.reset()
    inputs = head_inputs(gen)

    def step(hidden, weight):
        kw = dict(old_logp=inputs["old_logp"], ref_logp=inputs["ref_logp"], beta=0.04, backend="torch")
        return klops.fused_linear_grpo_loss(hidden, weight, inputs["completion_ids"], inputs["advantages"],
                                            inputs["mask"], **kw)[0]  # fmt: skip

    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        hidden, weight = inputs["hidden"].clone().requires_grad_(), inputs["weight"].clone().requires_grad_()
        fn(hidden, weight).backward()
        grads.append((hidden.grad, weight.grad))
    for name, compiled, eager in zip(PARAMS, grads[1], grads[0]):
        assert_close(compiled, eager, (1e-5, 1e-6), f"compiled {name} grad")


def test_three_products_not_four(gen):
    """Forward + backward make 3 matmul products of 2 N V D (the logits, grad_hidden, grad_weight), where the
    recomputing path forms the logits again in its backward (4)."""
    inputs = head_inputs(gen)
    counts = []
    for gradient_in_forward in (True, False):
        with torch.profiler.profile() as profile:
            run(inputs, gradient_in_forward, loss_type="dapo", backend=CPU_BACKENDS[0])
        counts.append(sum(e.name in ("aten::mm", "aten::addmm") for e in profile.events()))
    assert counts == [3, 4], counts


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)], ids=["no sequences", "no tokens"])
def test_empty_batch(shape, gen):
    """No rows: the path (no sequences) or the recomputing one (L = 0) gives a 0 loss and zero gradients."""
    hidden, weight = randn(*shape, D, gen=gen).requires_grad_(), randn(V, D, gen=gen).requires_grad_()
    ids, mask = torch.zeros(shape, dtype=torch.long, device=DEVICE), torch.ones(shape, device=DEVICE)
    loss, _ = klops.fused_linear_grpo_loss(hidden, weight, ids, randn(shape[0], gen=gen), mask)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == hidden.shape
    assert not weight.grad.any()
