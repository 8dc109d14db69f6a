"""klops.grpo_loss (and its helpers) against the float64 token-by-token reference (docs/losses.md §3)."""

import ast
import inspect
import math
import re
from pathlib import Path

import pytest
import torch

import klops
from klops import _grpo_types as grpo_types
from klops import grpo as grpo_module
from klops.reference import (
    fused_kl_reference,
    group_advantages_reference,
    grpo_loss_reference,
    logprobs_reference,
)

from .conftest import DEVICE, assert_close, randn

LOSS_TYPES = list(klops.grpo.LOSS_TYPES)
B, L = 4, 9
NEEDS = {"dro": dict(dro_beta=0.5)}  # the arguments a loss type cannot run without


def rl_inputs(gen, B=B, L=L):
    """Per-token log-probs with old / ref / rollout log-probs spread so that ratios cross both clip
    bounds; a fully masked sequence, ragged lengths, one zero advantage."""
    logp = -(torch.rand(B, L, generator=gen, dtype=torch.float64) * 3 + 0.05)
    old = logp + torch.randn(B, L, generator=gen, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(B, L, generator=gen, dtype=torch.float64) * 0.5
    rollout = old + torch.randn(B, L, generator=gen, dtype=torch.float64) * 0.2
    entropy = torch.rand(B, L, generator=gen, dtype=torch.float64) * 2
    advantages = torch.randn(B, generator=gen, dtype=torch.float64)
    advantages[1] = 0.0
    mask = torch.ones(B, L)
    mask[0, 6:] = 0
    mask[2] = 0
    mask[3, :2] = 0
    tensors = dict(logp=logp, old_logp=old, ref_logp=ref, rollout_logp=rollout, entropy=entropy,
                   advantages=advantages, mask=mask)  # fmt: skip
    return {k: v.float().to(DEVICE) for k, v in tensors.items()}


def run_both(inputs, seed=None, **kw):
    """(loss, d loss / d logp, metrics) from klops and (loss, grad) from the reference; ``seed`` seeds a
    generator of its own for each (clip_cov's random draw)."""
    x = dict(inputs)
    if seed is not None:
        kw_ref = kw | {"generator": torch.Generator(device=DEVICE).manual_seed(seed)}
        kw = kw | {"generator": torch.Generator(device=DEVICE).manual_seed(seed)}
    else:
        kw_ref = kw
    logp = x.pop("logp")
    z = logp.clone().requires_grad_()
    z_ref = logp.double().clone().requires_grad_()
    advantages, mask = x.pop("advantages"), x.pop("mask")
    loss, metrics = klops.grpo_loss(z, advantages, mask, **x, **kw)
    ref = grpo_loss_reference(z_ref, advantages, mask, **x, **kw_ref)
    loss.backward()
    ref.backward()
    return loss, z.grad, metrics, ref, z_ref.grad


def check(inputs, seed=None, **kw):
    loss, grad, metrics, ref, ref_grad = run_both(inputs, seed, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, (1e-5, 1e-6), "loss", floor=1e-7)
    assert_close(grad, ref_grad, (1e-4, 1e-5), "grad", floor=1e-8)
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, name
    return metrics


def cases():
    for loss_type in LOSS_TYPES:
        for level in ("token", "sequence"):
            if level == "sequence" and klops.grpo.LOSS_TYPES[loss_type].ratio != "either":
                continue  # token-only types reject it; gspo and gspo_token take the sequence ratio whatever it says
            for beta in (0.0, 0.04):
                for rollout in (None, "token_mask" if loss_type == "vespo" else "sequence_mask"):
                    yield loss_type, level, beta, rollout


@pytest.mark.parametrize("loss_type, level, beta, rollout", list(cases()))
def test_matches_reference(loss_type, level, beta, rollout, gen):
    inputs = dppo_inputs(gen) if loss_type in DPPO else rl_inputs(gen)
    if rollout is None:
        inputs.pop("rollout_logp")
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_high=0.28)
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.1  # the cap itself, inside the spread of ratios
    # Select a few tokens of a batch of 24: verl's defaults select one in 5000.
    kw |= dict(clip_cov=dict(clip_cov_ratio=0.15, clip_cov_lb=-0.5), kl_cov=dict(kl_cov_ratio=0.15)).get(loss_type, {})
    # DPPO's thresholds (verl's example: 0.15 for TV, 0.05 for KL) and cap set so that tokens are dropped and capped
    kw |= DPPO.get(loss_type, {}) | NEEDS.get(loss_type, {})
    if rollout is not None:
        kw |= dict(rollout_correction=rollout, rollout_clip_max=1.2)
    metrics = check(inputs, seed=7, **kw)
    if loss_type in ("clip_cov", "kl_cov"):
        assert metrics["cov_fraction"].item() > 0
    if loss_type in DPPO:
        assert metrics["clip_ratio/region"].item() > 0 and metrics["clip_ratio/truncated"].item() > 0


DPPO = dict(dppo_tv=dict(epsilon=0.02, epsilon_high=0.03, dppo_ratio_cap=1.3),
            dppo_kl=dict(epsilon=0.002, epsilon_high=0.003, dppo_ratio_cap=1.3))  # fmt: skip


def dppo_inputs(gen):
    """rl_inputs of 8 sequences, three of each advantage sign, with old_logp <= 0: DPPO reads exp(old_logp) as a
    probability (above 1 its binary KL is NaN)."""
    inputs = rl_inputs(gen, B=8)
    inputs["old_logp"] = inputs["old_logp"].clamp(max=-1e-3)
    inputs["advantages"] = torch.tensor([0.8, 0.0, 1.2, -0.9, 0.5, -1.1, 1.5, -0.4], device=DEVICE)
    return inputs


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_delta_and_bias_corrected_kl(loss_type, gen):
    for kw in (dict(delta=1.1), dict(delta=1.5, beta=0.1, use_bias_correction_kl=True)):
        check(rl_inputs(gen), loss_type=loss_type, **kw)


@pytest.mark.parametrize("mode", klops.grpo.ROLLOUT_CORRECTIONS)
@pytest.mark.parametrize("clip", [(None, 1.1), (0.9, 1.3), (0.95, None)])
def test_rollout_corrections(mode, clip, gen):
    if mode.endswith("truncate") and clip == (None, None):
        return
    check(rl_inputs(gen), loss_type="dapo", rollout_correction=mode, rollout_clip_min=clip[0],
          rollout_clip_max=clip[1])  # fmt: skip


@pytest.mark.parametrize("estimator", klops.grpo.KL_ESTIMATORS)
def test_kl_estimators_in_the_loss(estimator, gen):
    check(rl_inputs(gen), loss_type="bnpo", beta=0.2, kl_estimator=estimator)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "sapo"])
def test_entropy_bonus_and_masks(loss_type, gen):
    """Entropy bonus (with gradient through the entropy), top-entropy masking, off-policy masking."""
    inputs = rl_inputs(gen)
    h = inputs["entropy"].clone().requires_grad_()
    h_ref = h.detach().double().requires_grad_()
    kw = dict(loss_type=loss_type, entropy_coef=0.05, top_entropy_quantile=0.4, off_policy_mask_threshold=0.05)
    x = {k: v for k, v in inputs.items() if k not in ("logp", "entropy", "advantages", "mask")}
    loss, _ = klops.grpo_loss(inputs["logp"], inputs["advantages"], inputs["mask"], entropy=h, **x, **kw)
    ref = grpo_loss_reference(inputs["logp"].double(), inputs["advantages"], inputs["mask"], entropy=h_ref, **x, **kw)
    loss.backward(), ref.backward()
    assert_close(loss, ref, (1e-5, 1e-6), "loss")
    assert_close(h.grad, h_ref.grad, (1e-5, 1e-7), "entropy grad", floor=1e-9)
    check(inputs, **kw)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("clip_cov", "kl_cov")])
def test_num_items_adds_micro_batches(loss_type, gen):
    """Micro-batch losses normalized by the global count (of tokens or sequences) sum to the full batch's
    (not clip_cov / kl_cov, whose token selection is per call, as in verl)."""
    inputs = rl_inputs(gen, B=6, L=8)
    x = {k: v for k, v in inputs.items() if k not in ("logp", "advantages", "mask", "rollout_logp")}
    kw = dict(loss_type=loss_type, beta=0.05, epsilon_high=1.1 if loss_type == "cispo" else None)
    kw |= NEEDS.get(loss_type, {})
    z = inputs["logp"].clone().requires_grad_()
    full, _ = klops.grpo_loss(z, inputs["advantages"], inputs["mask"], **x, **kw)
    full.backward()
    unit = klops.grpo.LOSS_TYPES[loss_type].aggregation
    num_items = inputs["mask"].sum() if unit == "tokens" else 6
    z_micro = inputs["logp"].clone().requires_grad_()
    for part in (slice(0, 2), slice(2, 6)):
        micro = {k: v[part] for k, v in x.items()}
        loss, _ = klops.grpo_loss(z_micro[part], inputs["advantages"][part], inputs["mask"][part],
                                  num_items=num_items, **micro, **kw)  # fmt: skip
        loss.backward()
    assert_close(z_micro.grad, z.grad, (1e-5, 1e-7), "micro-batch grad")


def test_all_masked_is_zero(gen):
    inputs = rl_inputs(gen)
    inputs["mask"] = torch.zeros(B, L, device=DEVICE)
    for loss_type in LOSS_TYPES:
        z = inputs["logp"].clone().requires_grad_()
        loss, metrics = klops.grpo_loss(z, inputs["advantages"], inputs["mask"], loss_type=loss_type, beta=0.1,
                                        ref_logp=inputs["ref_logp"], entropy=inputs["entropy"], entropy_coef=0.1,
                                        top_entropy_quantile=0.5, **NEEDS.get(loss_type, {}))  # fmt: skip
        loss.backward()
        assert loss.item() == 0.0 and (z.grad == 0).all(), loss_type
        assert all(torch.isfinite(v) for v in metrics.values()), (loss_type, metrics)


def test_tie_counts_as_unclipped():
    """A ratio exactly on the clip bound takes the unclipped gradient and is not counted as clipped."""
    bound = torch.tensor(1.25)
    x = torch.tensor(math.log(1.25))
    while torch.exp(x) != bound:  # the fp32 log-ratio whose exp is exactly 1.25
        x = torch.nextafter(x, torch.tensor(1.0) if torch.exp(x) < bound else torch.tensor(0.0))
    logp = torch.tensor([[x.item() - 1.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.0, -0.5]])
    loss, metrics = klops.grpo_loss(logp, torch.tensor([2.0]), torch.ones(1, 2), old_logp=old, epsilon=0.25)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-2.0 * 1.25 / 2, -2.0 / 2]]), (1e-6, 0), "tie grad")
    assert metrics["clip_ratio/high"].item() == 0.0


def test_clip_metrics(gen):
    inputs = rl_inputs(gen)
    metrics = check(inputs, loss_type="dapo", epsilon=0.2, epsilon_high=0.28)
    m = inputs["mask"] > 0
    r = torch.exp(inputs["logp"] - inputs["old_logp"])
    A = inputs["advantages"][:, None].expand(B, L)
    low = ((r < 0.8) & (A < 0))[m].float().mean()
    high = ((r > 1.28) & (A > 0))[m].float().mean()
    assert_close(metrics["clip_ratio/low"], low, (1e-6, 0), "low")
    assert_close(metrics["clip_ratio/high"], high, (1e-6, 0), "high")
    assert_close(metrics["ratio"], r[m].mean(), (1e-6, 0), "ratio")
    assert 0 < low.item() < 1 and 0 < high.item() < 1


def test_long_sequences(gen):
    """L = 70000 (Liger's Triton GRPO fails at L >= 65536): the dapo gradient is -A / n_tok at r = 1."""
    logp = (-torch.rand(2, 70000, generator=gen)).to(DEVICE).requires_grad_()
    mask = torch.ones(2, 70000, device=DEVICE)
    mask[1, 50000:] = 0
    advantages = torch.tensor([0.5, -1.5], device=DEVICE)
    loss, _ = klops.grpo_loss(logp, advantages, mask, importance_sampling_level="sequence")
    loss.backward()
    expected = -advantages[:, None] * mask / mask.sum()
    assert_close(logp.grad, expected, (1e-5, 0), "grad")


def test_group_advantages(gen):
    rewards = torch.randn(12, generator=gen, dtype=torch.float64)
    rewards[3] = math.nan
    rewards[8:12] = 1.0  # a group with zero variance
    for scale in ("group", "batch", "none"):
        got = klops.group_advantages(rewards.float(), 4, scale=scale)
        expected = group_advantages_reference(rewards, 4, scale=scale)
        assert_close(got, expected, (1e-5, 1e-6), scale)
        assert got[3].item() == 0.0 and (got[8:] == 0).all()
    with pytest.raises(ValueError, match="group_size=5 must divide the number of rewards, 12"):
        klops.group_advantages(rewards, 5)
    with pytest.raises(ValueError, match="scale must be one of"):
        klops.group_advantages(rewards, 4, scale="std")


@pytest.mark.parametrize("estimator", klops.grpo.KL_ESTIMATORS)
def test_kl_estimate(estimator, gen):
    logp = -torch.rand(50, generator=gen, dtype=torch.float64) * 4
    ref = -torch.rand(50, generator=gen, dtype=torch.float64) * 4
    z = logp.float().requires_grad_()
    kl = klops.kl_estimate(z, ref.float(), estimator)
    kl.sum().backward()
    rho = ref - logp
    value = {"k1": -rho, "k2": 0.5 * rho**2, "k3": rho.exp() - rho - 1, "abs": rho.abs()}[estimator]
    grad = {"k1": 1.0 + 0 * rho, "k2": -rho, "k3": 1 - rho.exp(), "abs": -rho.sign()}[estimator]
    assert_close(kl, value, (1e-5, 1e-6), "value")
    assert_close(z.grad, grad, (1e-5, 1e-6), "grad")


BAD = [
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(epsilon=0.0), ValueError, "epsilon must lie in"),
    (dict(advantages=torch.zeros(3)), ValueError, r"advantages must have shape \(4,\) or \(4, 9\)"),
    (dict(mask=torch.ones(4, 8)), ValueError, "mask must be a tensor of the shape of logp"),
    (dict(old_logp=torch.zeros(4, 8)), ValueError, r"old_logp must have the shape of logp \(4, 9\)"),
    (dict(beta=0.1, ref_logp=None), ValueError, "beta > 0 needs ref_logp"),
    (dict(delta=1.5, loss_type="sapo"), ValueError, "delta .* not 'sapo'"),
    (dict(importance_sampling_level="sequence", loss_type="gpg"), ValueError, "takes no sequence-level ratio"),
    (dict(importance_sampling_level="sequence", loss_type="kl_cov"), ValueError, "takes no sequence-level ratio"),
    (dict(top_entropy_quantile=0.5, entropy=None), ValueError, "need entropy"),
    (dict(rollout_correction="token_truncate", rollout_clip_max=None), ValueError, "needs rollout_clip_min or"),
    (dict(rollout_clip_min=2.0, rollout_clip_max=1.0), ValueError, "must be below rollout_clip_max"),
    (dict(importance_sampling_level="tokens"), ValueError, "importance_sampling_level must be one of"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
    (dict(loss_type="dro"), ValueError, "loss_type='dro' needs dro_beta > 0"),
    (dict(loss_type="dro", dro_beta=0.0), ValueError, "dro_beta must lie in"),
    (dict(importance_sampling_level="sequence", loss_type="dppo_tv"), ValueError, "takes no sequence-level ratio"),
    (dict(delta=1.5, loss_type="dppo_kl"), ValueError, "delta .* not 'dppo_kl'"),
    (dict(dppo_ratio_cap=0.0), ValueError, "dppo_ratio_cap must lie in"),
    (dict(kl_clamp=-1.0), ValueError, "kl_clamp must lie in"),
]


@pytest.mark.parametrize("overrides, error, message", BAD)
def test_rejects(overrides, error, message, gen):
    inputs = rl_inputs(gen)
    kw = dict(advantages=inputs["advantages"], mask=inputs["mask"], ref_logp=inputs["ref_logp"],
              rollout_logp=inputs["rollout_logp"], entropy=inputs["entropy"]) | overrides  # fmt: skip
    with pytest.raises(error, match=message):
        klops.grpo_loss(inputs["logp"], kw.pop("advantages"), kw.pop("mask"), **kw)


def from_logits_inputs(gen, V=37):
    logits = randn(3, 6, V, gen=gen, scale=2.0)
    ref_logits = randn(3, 6, V, gen=gen, scale=2.0)
    ids = torch.randint(0, V, (3, 6), generator=gen).to(DEVICE)
    mask = torch.ones(3, 6, device=DEVICE)
    mask[0, 4:] = 0
    ids[0, 4:] = -100  # padding ids outside the vocabulary are never read
    advantages = torch.tensor([1.0, -0.5, 0.3], device=DEVICE)
    return logits, ref_logits, ids, mask, advantages


@pytest.mark.parametrize("kl", ["k3", "full"])
def test_from_logits(kl, backend, gen):
    """The logits form equals the reference's log-probs / entropy fed to the reference loss; the full KL
    is the per-token reverse KL over the vocabulary."""
    logits, ref_logits, ids, mask, advantages = from_logits_inputs(gen)
    kw = dict(loss_type="grpo", beta=0.1, entropy_coef=0.01, top_entropy_quantile=0.5, temperature=0.7)
    z = logits.clone().requires_grad_()
    loss, metrics = klops.grpo_loss_from_logits(z, ids, advantages, mask, ref_logits=ref_logits, kl_estimator=kl,
                                                backend=backend, **kw)  # fmt: skip
    loss.backward()
    z_ref = logits.double().clone().requires_grad_()
    labels = torch.where(mask > 0, ids, -100)
    logp, entropy = logprobs_reference(z_ref / 0.7, labels)
    kw.pop("temperature")
    if kl == "full":
        expected = grpo_loss_reference(logp, advantages, mask, entropy=entropy, **{**kw, "beta": 0.0})
        full = fused_kl_reference(z_ref, ref_logits, "reverse", temperature=0.7, labels=labels, reduction="none")
        expected = expected + 0.1 * ((full * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        ref_logp, _ = logprobs_reference(ref_logits.double() / 0.7, labels)
        expected = grpo_loss_reference(logp, advantages, mask, entropy=entropy, ref_logp=ref_logp, **kw)
    expected.backward()
    assert_close(loss, expected, (1e-5, 1e-6), "loss")
    assert_close(z.grad, z_ref.grad, (1e-4, 1e-5), "logits grad")
    assert "entropy" in metrics and "kl" in metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_quantile_is_nanquantile(dtype, gen):
    """The entropy cutoff's quantile (a sort, compilable with fullgraph=True on torch 2.11) equals the installed
    torch's nanquantile over the kept entries to the bit, with ties, q at 0 and 1, and NaN when nothing is kept or
    there is nothing."""
    for trial in range(600):  # an ulp off in a third of the trials (torch 2.14's float64 rank) fails it
        n = int(torch.randint(0, 30, (), generator=gen))
        values = torch.randn(3, n, generator=gen, dtype=torch.float64).to(dtype)
        values = values.round() if trial % 3 == 0 else values  # ties
        keep = torch.rand(3, n, generator=gen) < [0.0, 1.0, 0.5, 0.1][trial % 4]
        q = [0.0, 1.0, float(torch.rand((), generator=gen)), 0.6, 1 - 0.4, 0.37][trial % 6]  # q: fp32 or not
        got = grpo_module._masked_quantile(values.to(DEVICE), keep.to(DEVICE), q).cpu()
        none = torch.tensor(math.nan, dtype=dtype)
        expected = torch.nanquantile(torch.where(keep, values, torch.nan).flatten(), q) if n else none
        assert got.dtype == dtype and (got == expected or (got.isnan() and expected.isnan())), (got, expected, q)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler, gen):
    """A training step through grpo_loss_from_logits compiles as one graph (torch backend on the CPU)."""
    torch._dynamo.reset()
    logits, ref_logits, ids, mask, advantages = from_logits_inputs(gen)

    def step(z):
        kw = dict(ref_logits=ref_logits, beta=0.04, entropy_coef=0.01, top_entropy_quantile=0.5, backend="torch")
        loss, metrics = klops.grpo_loss_from_logits(z, ids, advantages, mask, **kw)
        return loss, metrics["clip_ratio/region"]

    grads = []
    for fn in (step, torch.compile(step, backend=compiler, fullgraph=True)):
        z = logits.clone().requires_grad_()
        fn(z)[0].backward()
        grads.append(z.grad)
    assert_close(grads[1], grads[0], (1e-5, 1e-6), "compiled grad")


def test_off_policy_sequence_mask():
    """A sequence is dropped when A < 0 and its mean drift log pi_sampler - log pi exceeds the threshold."""
    logp = torch.full((4, 5), -1.0, device=DEVICE, requires_grad=True)
    drift = torch.tensor([0.2, -0.2, 0.5, 0.0], device=DEVICE)
    rollout = logp.detach() + drift[:, None]
    advantages = torch.tensor([-1.0, -1.0, 1.0, -1.0], device=DEVICE)
    loss, _ = klops.grpo_loss(logp, advantages, torch.ones(4, 5, device=DEVICE), rollout_logp=rollout,
                              off_policy_mask_threshold=0.1, rollout_correction="token_truncate",
                              rollout_clip_max=100.0)  # fmt: skip
    loss.backward()
    kept = torch.tensor([0.0, 1.0, 1.0, 1.0], device=DEVICE)
    expected = (-advantages * torch.exp(-drift) * kept / 20)[:, None].expand(4, 5)
    assert_close(logp.grad, expected, (1e-6, 0), "grad")


@pytest.mark.parametrize("kl", ["k3", "full"])
def test_fused_linear_matches_logits_form(kl, backend, gen):
    """fused_linear_grpo_loss equals grpo_loss_from_logits on logits formed explicitly (hidden @ W.T + b),
    gradients to hidden, weight and bias included."""
    V, D = 37, 12
    _, _, ids, mask, advantages = from_logits_inputs(gen, V=V)
    hidden, weight, bias = randn(3, 6, D, gen=gen), randn(V, D, gen=gen), randn(V, gen=gen)
    ref_hidden, ref_weight = randn(3, 6, 8, gen=gen), randn(V, 8, gen=gen)
    kw = dict(loss_type="dapo", beta=0.1, entropy_coef=0.01, kl_estimator=kl, temperature=0.8, backend=backend)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = klops.fused_linear_grpo_loss(*params[:2], ids, advantages, mask, bias=params[2],
                                                 ref_hidden=ref_hidden, ref_weight=ref_weight, **kw)  # fmt: skip
    loss.backward()
    explicit = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = explicit[0] @ explicit[1].t() + explicit[2]
    expected, expected_metrics = klops.grpo_loss_from_logits(logits, ids, advantages, mask,
                                                             ref_logits=ref_hidden @ ref_weight.t(), **kw)  # fmt: skip
    expected.backward()
    assert_close(loss, expected, (1e-5, 1e-6), "loss")
    for name, ours, theirs in zip(("hidden", "weight", "bias"), params, explicit):
        assert_close(ours.grad, theirs.grad, (1e-4, 1e-5), f"{name} grad")
    assert_close(metrics["kl"], expected_metrics["kl"], (1e-5, 1e-7), "kl metric")


def test_fused_linear_compile_fullgraph(gen):
    """A training step through fused_linear_grpo_loss compiles as one graph (torch backend on the CPU)."""
    torch._dynamo.reset()
    _, _, ids, mask, advantages = from_logits_inputs(gen, V=37)
    hidden, weight, ref_hidden, ref_weight = (
        randn(3, 6, 12, gen=gen),
        randn(37, 12, gen=gen),
        randn(3, 6, 8, gen=gen),
        randn(37, 8, gen=gen),
    )

    def step(h, w):
        kw = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, beta=0.04, entropy_coef=0.01, backend="torch")
        loss, _ = klops.fused_linear_grpo_loss(h, w, ids, advantages, mask, **kw)
        return loss

    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fn(h, w).backward()
        grads.append(w.grad)
    assert_close(grads[1], grads[0], (1e-5, 1e-6), "compiled grad")


def test_gspo_forms(gen):
    """gspo is the paper's sequence-level ratio, grpo with importance_sampling_level="sequence"; gspo_token (verl's
    gspo) takes sg(s_i) pi_t / sg(pi_t): the same values, the same gradients when the advantage is constant within
    each sequence, different ones otherwise."""
    inputs = rl_inputs(gen)
    x = dict(old_logp=inputs["old_logp"], epsilon=0.05, epsilon_high=0.08)  # some sequences clipped, some not

    def run(advantages, **kw):
        z = inputs["logp"].clone().requires_grad_()
        loss, metrics = klops.grpo_loss(z, advantages, inputs["mask"], **x, **kw)
        loss.backward()
        return loss, z.grad, metrics

    per_sequence = inputs["advantages"]
    grpo_seq = run(per_sequence, loss_type="grpo", importance_sampling_level="sequence")
    gspo, gspo_token = run(per_sequence, loss_type="gspo"), run(per_sequence, loss_type="gspo_token")
    assert torch.equal(gspo[0], grpo_seq[0]) and torch.equal(gspo[1], grpo_seq[1])
    assert_close(gspo_token[0], gspo[0], (1e-6, 1e-7), "value")
    assert_close(gspo_token[1], gspo[1], (1e-5, 1e-8), "grad, A constant per sequence", floor=1e-9)
    assert gspo[2].keys() == gspo_token[2].keys() and gspo[2]["clip_ratio/region"].item() > 0
    for name in gspo[2]:
        assert_close(gspo_token[2][name], gspo[2][name], (1e-6, 0), name)
    per_token = per_sequence[:, None] + torch.randn(B, L, generator=gen).to(DEVICE)  # A varies within sequences
    gspo, gspo_token = run(per_token, loss_type="gspo"), run(per_token, loss_type="gspo_token")
    assert_close(gspo_token[0], gspo[0], (1e-6, 1e-7), "value, A per token")
    assert (gspo_token[1] - gspo[1]).abs().max().item() > 1e-3


def test_kl_clamp(gen):
    """verl's low_var_kl is k3 clamped to [-10, 10]: at rho = ref_logp - logp = 3.5 it gives 10 with a zero
    gradient, where k3 gives 28.6 with gradient 1 - e^3.5 = -32.1; inside the clamp nothing changes."""
    logp = torch.tensor([-4.0, -1.0, -0.5], device=DEVICE, requires_grad=True)
    ref = torch.tensor([-0.5, -1.2, -0.5], device=DEVICE)  # rho = 3.5, -0.2, 0
    for clamp, value, grad in ((None, math.exp(3.5) - 4.5, 1 - math.exp(3.5)), (10.0, 10.0, 0.0)):
        logp.grad = None
        kl = klops.kl_estimate(logp, ref, "k3", clamp=clamp)
        kl.sum().backward()
        assert_close(kl[0], torch.tensor(value), (1e-6, 0), f"value, clamp={clamp}")
        assert_close(logp.grad[0], torch.tensor(grad), (1e-6, 0), f"grad, clamp={clamp}")
        assert_close(kl[1:], torch.tensor([math.exp(-0.2) + 0.2 - 1, 0.0]), (1e-6, 1e-8), "inside")
    assert round(math.exp(3.5) - 4.5, 1) == 28.6 and round(1 - math.exp(3.5), 1) == -32.1  # the numbers quoted
    check(rl_inputs(gen), loss_type="dapo", beta=0.3, kl_clamp=0.2)  # the option reaches grpo_loss's KL term


def test_dppo_metrics(gen):
    """DPPO's clip metrics count the dropped tokens by the sign of A (verl's pg_clipfrac is their sum) and the kept
    tokens whose ratio passes dppo_ratio_cap (verl's pg_clipfrac_lower)."""
    inputs = dppo_inputs(gen)
    m = inputs["mask"] > 0
    p, p_old = inputs["logp"].double().exp(), inputs["old_logp"].double().exp()
    A = inputs["advantages"][:, None].expand_as(m)
    r = torch.exp(inputs["logp"] - inputs["old_logp"])
    kept = torch.where(A > 0, p - p_old <= 0.03, p - p_old >= -0.02)
    metrics = check(inputs, loss_type="dppo_tv", **DPPO["dppo_tv"])
    for name, selected in (("low", ~kept & (A < 0)), ("high", ~kept & (A > 0)), ("region", ~kept & (A != 0)),
                           ("truncated", kept & (r > 1.3))):  # fmt: skip
        assert_close(metrics[f"clip_ratio/{name}"], selected[m].float().mean(), (1e-6, 0), name)
        assert 0 < metrics[f"clip_ratio/{name}"].item() < 1, name


def test_dro_matches_verls_example():
    """verl's own DRO test case (tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py, verl-project/verl 1dda039):
    token-mean of -(logp A - beta / 2 (logp - old)^2) over the mask."""
    old = torch.tensor([[-1.0, -0.7, -0.2]], device=DEVICE)
    logp = torch.tensor([[-0.8, -0.9, -0.1]], device=DEVICE, requires_grad=True)
    advantages = torch.tensor([[2.0, -1.5, 9.0]], device=DEVICE)
    mask = torch.tensor([[1.0, 1.0, 0.0]], device=DEVICE)
    loss, _ = klops.grpo_loss(logp, advantages, mask, old_logp=old, loss_type="dro", dro_beta=0.05)
    loss.backward()
    expected = (-(logp.detach() * advantages - 0.025 * (logp.detach() - old).square()) * mask).sum() / 2
    assert_close(loss, expected, (1e-6, 0), "loss")
    assert_close(logp.grad, -(advantages - 0.05 * (logp.detach() - old)) * mask / 2, (1e-6, 0), "grad")


@pytest.mark.parametrize("loss_type", ["gspo_token", "dppo_kl", "dro"])
def test_new_types_compile_fullgraph(loss_type, gen):
    torch._dynamo.reset()
    inputs = rl_inputs(gen)

    def step(z):
        loss, metrics = klops.grpo_loss(z, inputs["advantages"], inputs["mask"], old_logp=inputs["old_logp"],
                                        loss_type=loss_type, **NEEDS.get(loss_type, {}))  # fmt: skip
        return loss, metrics["ratio"]

    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        z = inputs["logp"].clone().requires_grad_()
        fn(z)[0].backward()
        grads.append(z.grad)
    assert_close(grads[1], grads[0], (1e-6, 1e-7), "compiled grad")


DOCS = Path(__file__).resolve().parent.parent / "docs" / "losses.md"


def test_docs_list_every_loss_type():
    """docs/losses.md §3's table of loss types names every type of klops.grpo.LOSS_TYPES and no other, each with
    the table's traits."""
    section = DOCS.read_text().split("\n## §3 ", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|( `.*)\|$", section, re.MULTILINE)  # not the header: its traits are plain
    documented = {name: [cell.strip().strip("`") for cell in cells.split("|")][:5] for name, cells in rows}
    assert documented.keys() == klops.grpo.LOSS_TYPES.keys(), (
        f"missing from the docs: {sorted(klops.grpo.LOSS_TYPES.keys() - documented.keys())}; "
        f"not loss types: {sorted(documented.keys() - klops.grpo.LOSS_TYPES.keys())}"
    )
    for name, spec in klops.grpo.LOSS_TYPES.items():
        assert documented[name] == [spec.ratio, spec.clip, spec.aggregation, spec.normalizer, spec.rollout], name


@pytest.mark.parametrize("module", [grpo_module, grpo_types])
def test_no_function_over_150_lines(module):
    tree = ast.parse(inspect.getsource(module))
    lengths = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    assert max(lengths.values()) <= 150, {name: n for name, n in lengths.items() if n > 150}


def test_fused_linear_grpo_logit_scale_and_softcap(gen):
    """fused_linear_grpo_loss with softcap and logit_scale (policy and reference, kl_estimator "full" too) equals
    grpo_loss_from_logits on the logits softcap(c (h W^T + b)) formed in full."""
    cap, scale = 4.0, 0.6
    hidden, ref_hidden = randn(4, 5, 16, gen=gen), randn(4, 5, 16, gen=gen)
    weight, bias = randn(31, 16, gen=gen), randn(31, gen=gen)
    ids = torch.randint(0, 31, (4, 5), generator=gen).to(DEVICE)
    mask = torch.ones(4, 5, device=DEVICE)
    mask[1, 3:] = 0
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], device=DEVICE)

    def logits(h):
        return cap * torch.tanh(scale * torch.nn.functional.linear(h, weight, bias) / cap)

    for estimator in ("k3", "full"):
        kw = dict(loss_type="grpo", beta=0.1, kl_estimator=estimator)
        reference = dict(ref_hidden=ref_hidden, ref_weight=weight, ref_bias=bias)
        got, metrics = klops.fused_linear_grpo_loss(hidden, weight, ids, advantages, mask, bias=bias, softcap=cap,
                                                    logit_scale=scale, **reference, **kw)  # fmt: skip
        want, want_metrics = klops.grpo_loss_from_logits(logits(hidden), ids, advantages, mask,
                                                         ref_logits=logits(ref_hidden), **kw)  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["kl"], want_metrics["kl"], rtol=1e-4, atol=1e-6)
