"""klops's GRPO and DPO losses against TRL's own trainer code on the same tensors (issues 17 and 18).

TRL 1.16 computes its losses inside trainer methods: ``GRPOTrainer._compute_loss(self, model, inputs)`` and
``DPOTrainer._compute_loss(self, model, inputs, return_outputs)``. Each test calls the unbound method with a
stub ``self`` holding exactly the attributes it reads (a one-process accelerator whose gather / reduce return
their input) and a stub model whose per-token log-probs (and entropies) are float64 leaf tensors, then
compares the loss and its gradient with klops's on the same leaves. TRL's configuration is mapped onto
klops's arguments explicitly (``klops_grpo_kwargs``); ``klops.grpo_loss``'s docstring states the mapping.

Every option a case turns on is also switched off on klops's side alone, and that result must differ from
TRL's: a comparison that could not fail would not test the option. The stubs follow TRL 1.16.0's code (the
version pinned in the ``test`` extra); under another version the module is skipped.
"""

import inspect
import math
import textwrap
import types
from collections import defaultdict

import pytest
import torch

import klops

TRL_VERSION = "1.16.0"

trl = pytest.importorskip("trl")
if trl.__version__ != TRL_VERSION:
    pytest.skip(f"the stubs follow TRL {TRL_VERSION}'s trainers, not {trl.__version__}'s", allow_module_level=True)
from trl import DPOConfig, GRPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

TIGHT = dict(rtol=1e-10, atol=1e-13)  # float64 on both sides
METRIC = dict(rtol=1e-6, atol=1e-7)  # klops's metrics are fp32


class Accelerator:
    """One process: gathers and reductions return their input."""

    num_processes = 1
    sync_gradients = True
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def fp32_exact(x: torch.Tensor) -> torch.Tensor:
    """float64 values that fp32 represents exactly: TRL takes the entropy quantile in fp32."""
    return x.float().double()


def close(a, b, tol=TIGHT) -> bool:
    return a.shape == b.shape and bool(torch.isclose(a.double(), b.double(), **tol).all())


def assert_matches(name, got, expected, tol=TIGHT):
    got, expected = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    if not close(got, expected, tol):
        worst = (got - expected).abs().max().item()
        raise AssertionError(
            f"{name}: klops {got.flatten()[:6].tolist()} != TRL {expected.flatten()[:6].tolist()} "
            f"(max |diff| {worst:.3g})"
        )


# ---------------------------------------------------------------------------------------------------- GRPO

B, L, PROMPT = 6, 7, 3


def grpo_tensors(seed=0):
    """Per-token log-probs whose ratios cross both clip bounds, old / ref / sampler log-probs, entropies,
    advantages of both signs and one 0, ragged completions, one fully masked, a tool mask with two holes."""
    gen = torch.Generator().manual_seed(seed)

    def rand(scale):
        return fp32_exact(torch.randn(B, L, generator=gen, dtype=torch.float64) * scale)

    logp = fp32_exact(-(torch.rand(B, L, generator=gen, dtype=torch.float64) * 3 + 0.05))
    completion_mask = torch.ones(B, L, dtype=torch.int64)
    completion_mask[0, 5:] = 0
    completion_mask[3, 5:] = 0  # 31 valid tokens: the entropy median is one of them, a tie at the cutoff
    completion_mask[4] = 0
    tool_mask = torch.ones(B, L, dtype=torch.int64)
    tool_mask[1, 2:4] = 0
    # Per-sequence drifts: A > 0 with r > 1 (clipped high), A < 0 with r > 1 (capped by delta), A < 0 with
    # r < 1 (clipped low, and off the policy for the off-policy mask), at token and at sequence level.
    drift = torch.tensor([-0.25, -0.3, 0.0, 0.25, 0.0, 0.1], dtype=torch.float64)[:, None]
    old = logp + rand(0.4) + drift
    return dict(
        logp=logp,
        entropy=fp32_exact(torch.rand(B, L, generator=gen, dtype=torch.float64) * 2),
        old_per_token_logps=old,
        ref_per_token_logps=logp + rand(0.5),
        sampling_per_token_logps=old + rand(0.2),
        advantages=torch.tensor([1.2, -0.7, 0.0, -1.5, 0.9, 0.6], dtype=torch.float64),
        completion_mask=completion_mask,
        tool_mask=tool_mask,
    )


# TRL's configuration of a plain case; variants override some of it.
BASE = dict(
    loss_type="dapo",
    epsilon=0.2,
    epsilon_high=0.28,
    delta=None,
    beta=0.0,
    use_bias_correction_kl=False,
    importance_sampling_level="token",
    top_entropy_quantile=1.0,
    off_policy_mask_threshold=None,
    entropy_coef=0.0,
    use_vllm=False,
    vllm_importance_sampling_correction=False,
    vllm_importance_sampling_mode="sequence_mask",
    vllm_importance_sampling_clip_min=None,
    vllm_importance_sampling_clip_max=3.0,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    max_completion_length=9,
    gradient_accumulation_steps=1,
    steps_per_generation=1,
    training=True,
    num_items_in_batch_scale=1,
    tool_mask=False,
)

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# variant: (TRL settings, the settings that switch its option off on klops's side only)
VARIANTS = {
    "plain": ({}, None),
    "kl": (dict(beta=0.1), dict(beta=0.0)),
    "kl_bias_corrected": (dict(beta=0.1, use_bias_correction_kl=True), dict(use_bias_correction_kl=False)),
    "delta": (dict(delta=1.5), dict(delta=None)),
    "entropy_mask": (dict(top_entropy_quantile=0.5), dict(top_entropy_quantile=1.0)),
    "entropy_bonus": (dict(entropy_coef=0.05), dict(entropy_coef=0.0)),
    "entropy_mask_and_bonus": (dict(top_entropy_quantile=0.4, entropy_coef=0.05), dict(top_entropy_quantile=1.0)),
    "off_policy_mask": (dict(off_policy_mask_threshold=0.0), dict(off_policy_mask_threshold=None)),
    "off_policy_mask_vllm": (
        dict(
            off_policy_mask_threshold=0.0,
            use_vllm=True,
            vllm_importance_sampling_correction=True,
            vllm_importance_sampling_mode="token_truncate",
        ),
        dict(off_policy_mask_threshold=None),
    ),
    **{
        f"vllm_{mode}": (
            dict(
                use_vllm=True,
                vllm_importance_sampling_correction=True,
                vllm_importance_sampling_mode=mode,
                vllm_importance_sampling_clip_min=0.9 if mode.endswith("truncate") else 0.8,
                vllm_importance_sampling_clip_max=1.1,
            )
            if mode.startswith("token")
            else dict(
                use_vllm=True,
                vllm_importance_sampling_correction=True,
                vllm_importance_sampling_mode=mode,
                vllm_importance_sampling_clip_min=0.45 if mode.endswith("truncate") else 0.35,
                vllm_importance_sampling_clip_max=1.5,
            ),
            dict(use_vllm=False, vllm_importance_sampling_correction=False),
        )
        for mode in IS_MODES
    },
    "tool_mask": (dict(tool_mask=True), dict(tool_mask=False)),
    "accumulation": (
        dict(gradient_accumulation_steps=2, steps_per_generation=4, num_items_in_batch_scale=3),
        dict(gradient_accumulation_steps=1, steps_per_generation=1),
    ),
    "accumulation_entropy_bonus": (
        dict(gradient_accumulation_steps=3, steps_per_generation=3, entropy_coef=0.05, num_items_in_batch_scale=3),
        dict(gradient_accumulation_steps=1, steps_per_generation=1),
    ),
    "eval": (
        dict(training=False, gradient_accumulation_steps=2, steps_per_generation=4, num_items_in_batch_scale=3),
        dict(training=True),
    ),
    "everything": (
        dict(
            beta=0.04,
            use_bias_correction_kl=True,
            delta=1.5,
            top_entropy_quantile=0.6,
            entropy_coef=0.02,
            off_policy_mask_threshold=0.05,
            use_vllm=True,
            vllm_importance_sampling_correction=True,
            vllm_importance_sampling_mode="token_mask",
            vllm_importance_sampling_clip_min=0.85,
            vllm_importance_sampling_clip_max=1.15,
            tool_mask=True,
            gradient_accumulation_steps=2,
            steps_per_generation=2,
            num_items_in_batch_scale=2,
        ),
        dict(beta=0.0, top_entropy_quantile=1.0, off_policy_mask_threshold=None),
    ),
}
PPO_CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
TRL_LOSS_TYPES = (*PPO_CLIP_TYPES, "cispo", "sapo", "vespo")


def grpo_cases():
    for loss_type in TRL_LOSS_TYPES:
        # TRL's sequence-level vespo is its token-level one but for the bias-corrected KL; klops rejects it.
        for level in ("token",) if loss_type == "vespo" else ("token", "sequence"):
            for variant, (settings, _) in VARIANTS.items():
                if "delta" in settings and loss_type not in PPO_CLIP_TYPES:
                    continue  # TRL applies delta to the PPO-clip types only; klops rejects it elsewhere
                if loss_type == "vespo" and settings.get("vllm_importance_sampling_mode", "token").startswith("seq"):
                    continue  # TRL (and klops) refuse vespo with a sequence-level sampler correction
                yield pytest.param(loss_type, level, variant, id=f"{loss_type}-{level}-{variant}")


def grpo_config(loss_type, level, settings):
    cfg = dict(BASE, loss_type=loss_type, importance_sampling_level=level, **settings)
    # Not the defaults, so that a crossed mapping shows; TRL's torch.where rounds these to fp32: fp32 numbers.
    if loss_type == "sapo":
        cfg |= dict(sapo_temperature_pos=0.75, sapo_temperature_neg=1.25)
    if loss_type == "vespo":
        cfg |= dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.25, vespo_lambda_neg=1.75)
    if loss_type == "cispo":  # epsilon_high is CISPO's cap on the ratio itself
        cfg["epsilon_high"] = 1.1 if level == "token" else 1.05
    if level == "sequence" and loss_type != "cispo":  # GSPO-sized bounds, so that sequence ratios get clipped
        cfg |= dict(epsilon=0.03, epsilon_high=0.04)
        if "delta" in settings:
            cfg["delta"] = 1.05
    return cfg


class GRPOStub:
    """The attributes of a GRPOTrainer that ``_compute_loss`` reads; the policy's forward returns the leaves."""

    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = GRPOTrainer.__dict__["get_off_policy_mask"]
    get_gamma_weights = GRPOTrainer.__dict__["get_gamma_weights"]

    def __init__(self, cfg, logp, entropy):
        self._leaves = (logp, entropy)
        self.accelerator = Accelerator()
        self.model = types.SimpleNamespace(training=cfg["training"])
        self.args = types.SimpleNamespace(
            use_bias_correction_kl=cfg["use_bias_correction_kl"],
            delta=cfg["delta"],
            sapo_temperature_pos=cfg["sapo_temperature_pos"],
            sapo_temperature_neg=cfg["sapo_temperature_neg"],
            vespo_k_pos=cfg["vespo_k_pos"],
            vespo_lambda_pos=cfg["vespo_lambda_pos"],
            vespo_k_neg=cfg["vespo_k_neg"],
            vespo_lambda_neg=cfg["vespo_lambda_neg"],
            steps_per_generation=cfg["steps_per_generation"],
        )
        self.loss_type = cfg["loss_type"]
        self.epsilon_low, self.epsilon_high = cfg["epsilon"], cfg["epsilon_high"]
        self.beta = cfg["beta"]
        self.importance_sampling_level = cfg["importance_sampling_level"]
        self.top_entropy_quantile = cfg["top_entropy_quantile"]
        self.off_policy_mask_threshold = cfg["off_policy_mask_threshold"]
        self.use_vllm = cfg["use_vllm"]
        self.vllm_importance_sampling_correction = cfg["vllm_importance_sampling_correction"]
        self.vllm_importance_sampling_mode = cfg["vllm_importance_sampling_mode"]
        self.vllm_importance_sampling_clip_min = cfg["vllm_importance_sampling_clip_min"]
        self.vllm_importance_sampling_clip_max = cfg["vllm_importance_sampling_clip_max"]
        self.max_completion_length = cfg["max_completion_length"]
        self.current_gradient_accumulation_steps = cfg["gradient_accumulation_steps"]
        self.entropy_coef = cfg["entropy_coef"]
        self.use_adaptive_entropy = False
        self._entropy_bonus_enabled = self.entropy_coef != 0.0
        self.aux_loss_enabled = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == L and input_ids.shape == (B, PROMPT + L)
        return *self._leaves, None


def trl_importance_sampling_ratio(stub, old, sampling, completion_mask, tool_mask):
    """TRL's vLLM importance-sampling ratio, run from its own source: the block of
    ``GRPOTrainer._generate_and_score_completions`` between the two comments below."""
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = source.index("# Compute the importance sampling ratio when using vLLM")
    end = source.index("# Compute the per-token log probabilities for the reference model")
    block = textwrap.dedent(source[source.rindex("\n", 0, start) + 1 : end])
    scope = dict(
        self=stub,
        old_per_token_logps=old,
        sampling_per_token_logps=sampling,
        torch=torch,
        math=math,
        completion_mask=completion_mask,
        tool_mask=tool_mask,
    )
    with torch.no_grad():
        exec(compile(block, "<GRPOTrainer._generate_and_score_completions>", "exec"), scope)
    return scope["vllm_importance_sampling_ratio"]


def leaves(t):
    return t["logp"].clone().requires_grad_(), t["entropy"].clone().requires_grad_()


def grads(loss, *xs):
    got = torch.autograd.grad(loss, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, xs)]


def trl_grpo(cfg, t):
    """(loss, d/d logp, d/d entropy, logged metrics) from TRL's GRPOTrainer._compute_loss."""
    logp, entropy = leaves(t)
    stub = GRPOStub(cfg, logp, entropy)
    tool_mask = t["tool_mask"] if cfg["tool_mask"] else None
    mask = t["completion_mask"] if tool_mask is None else t["completion_mask"] * tool_mask
    inputs = dict(
        prompt_ids=torch.zeros(B, PROMPT, dtype=torch.int64),
        prompt_mask=torch.ones(B, PROMPT, dtype=torch.int64),
        completion_ids=torch.zeros(B, L, dtype=torch.int64),
        completion_mask=t["completion_mask"],
        advantages=t["advantages"],
        old_per_token_logps=t["old_per_token_logps"],
        num_items_in_batch=mask.sum() * cfg["num_items_in_batch_scale"],
    )
    if tool_mask is not None:
        inputs["tool_mask"] = tool_mask
    if cfg["beta"] != 0.0:
        inputs["ref_per_token_logps"] = t["ref_per_token_logps"]
    if cfg["use_vllm"] and cfg["vllm_importance_sampling_correction"]:
        inputs["sampling_per_token_logps"] = t["sampling_per_token_logps"]
        inputs["importance_sampling_ratio"] = trl_importance_sampling_ratio(
            stub, t["old_per_token_logps"], t["sampling_per_token_logps"], t["completion_mask"], tool_mask
        )
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    mode = "train" if cfg["training"] else "eval"
    return loss, *grads(loss, logp, entropy), stub._metrics[mode]


def klops_grpo_kwargs(cfg, t):
    """TRL's GRPOTrainer configuration as klops.grpo_loss arguments (one process)."""
    mask = t["completion_mask"] * (t["tool_mask"] if cfg["tool_mask"] else 1)
    # TRL divides by its current_gradient_accumulation_steps in training only.
    accumulation = cfg["gradient_accumulation_steps"] if cfg["training"] else 1
    num_items_in_batch = mask.sum() * cfg["num_items_in_batch_scale"]
    loss_type = cfg["loss_type"]
    if loss_type in ("grpo", "dr_grpo", "sapo", "luspo"):  # sequence means over B sequences per micro-batch
        num_items = B * accumulation
    elif loss_type == "bnpo":  # the micro-batch's token mean
        num_items = mask.sum() * accumulation
    else:  # dapo, cispo, vespo: num_items_in_batch spans the generation batch (steps_per_generation steps)
        scale = cfg["gradient_accumulation_steps"] / cfg["steps_per_generation"] if cfg["training"] else 1
        num_items = num_items_in_batch.clamp(min=1) / Accelerator.num_processes * scale
    kwargs = dict(
        old_logp=t["old_per_token_logps"],
        ref_logp=t["ref_per_token_logps"],
        loss_type=loss_type,
        epsilon=cfg["epsilon"],
        epsilon_high=cfg["epsilon_high"],
        delta=cfg["delta"],
        beta=cfg["beta"],
        kl_estimator="k3",
        use_bias_correction_kl=cfg["use_bias_correction_kl"],
        importance_sampling_level=cfg["importance_sampling_level"],
        top_entropy_quantile=cfg["top_entropy_quantile"],
        off_policy_mask_threshold=cfg["off_policy_mask_threshold"],
        entropy_coef=cfg["entropy_coef"] / accumulation,
        num_items=num_items,
        max_completion_length=cfg["max_completion_length"],
        sapo_temperature_pos=cfg["sapo_temperature_pos"],
        sapo_temperature_neg=cfg["sapo_temperature_neg"],
        vespo_k_pos=cfg["vespo_k_pos"],
        vespo_lambda_pos=cfg["vespo_lambda_pos"],
        vespo_k_neg=cfg["vespo_k_neg"],
        vespo_lambda_neg=cfg["vespo_lambda_neg"],
    )
    if cfg["use_vllm"] and cfg["vllm_importance_sampling_correction"]:
        kwargs |= dict(
            rollout_logp=t["sampling_per_token_logps"],
            rollout_correction=cfg["vllm_importance_sampling_mode"],
            rollout_clip_min=cfg["vllm_importance_sampling_clip_min"],
            rollout_clip_max=cfg["vllm_importance_sampling_clip_max"],
        )
    return mask, kwargs


def klops_grpo(cfg, t):
    logp, entropy = leaves(t)
    mask, kwargs = klops_grpo_kwargs(cfg, t)
    loss, metrics = klops.grpo_loss(logp, t["advantages"], mask, entropy=entropy, **kwargs)
    return loss, *grads(loss, logp, entropy), metrics


def compare_grpo_metrics(cfg, metrics, logged):
    assert_matches("entropy metric", metrics["entropy"], logged["entropy"][-1], METRIC)
    if cfg["beta"] != 0:
        assert_matches("kl metric", metrics["kl"], logged["kl"][-1], METRIC)
    if cfg["importance_sampling_level"] == "sequence":
        return  # TRL averages sequence-level clip fractions over sequences; klops weights them by tokens
    if cfg["loss_type"] in PPO_CLIP_TYPES:
        for side in ("low", "high", "region"):
            name = f"clip_ratio/{side}"
            assert_matches(name, metrics[name], logged[f"{name}_mean"][-1], METRIC)
    elif cfg["loss_type"] == "cispo":
        assert_matches("cispo clip ratio", metrics["clip_ratio/high"], logged["cispo_clip_ratio"][-1], METRIC)


@pytest.mark.parametrize("loss_type, level, variant", list(grpo_cases()))
def test_grpo_matches_trl(loss_type, level, variant):
    settings, switch_off = VARIANTS[variant]
    cfg = grpo_config(loss_type, level, settings)
    t = grpo_tensors()
    loss, grad, grad_h, logged = trl_grpo(cfg, t)
    got, got_grad, got_grad_h, metrics = klops_grpo(cfg, t)
    assert_matches("loss", got, loss)
    assert_matches("d loss / d logp", got_grad, grad)
    assert_matches("d loss / d entropy", got_grad_h, grad_h)
    compare_grpo_metrics(cfg, metrics, logged)
    assert grad.abs().sum() > 0
    if cfg["loss_type"] in PPO_CLIP_TYPES or cfg["loss_type"] == "cispo":  # the clipped branches are exercised
        assert metrics.get("clip_ratio/low", torch.tensor(1.0)) > 0 and metrics["clip_ratio/high"] > 0
    if switch_off is not None:  # klops without the option must not match TRL with it
        off, off_grad, off_grad_h, _ = klops_grpo(dict(cfg, **switch_off), t)
        differs = not (close(off, loss) and close(off_grad, grad) and close(off_grad_h, grad_h))
        assert differs, f"{variant}: switching {switch_off} off on klops's side alone changes nothing"


def test_grpo_perturbed_klops_fails():
    """The comparison notices a 1e-7 relative change of one log-prob and a wrong normalizer."""
    cfg = grpo_config("dapo", "token", {})
    t = grpo_tensors()
    loss, grad, _, _ = trl_grpo(cfg, t)
    bumped = dict(t, logp=t["logp"].clone())
    bumped["logp"][1, 1] *= 1 + 1e-7
    got, got_grad, _, _ = klops_grpo(cfg, bumped)
    assert not (close(got, loss) and close(got_grad, grad))
    got, got_grad, _, _ = klops_grpo(dict(cfg, num_items_in_batch_scale=1.01), t)
    assert not close(got, loss)


def test_grpo_default_normalizers():
    """With one micro-batch per step klops's defaults (num_items=None) are TRL's normalizers."""
    t = grpo_tensors()
    for loss_type in TRL_LOSS_TYPES:
        cfg = grpo_config(loss_type, "token", {})
        loss = trl_grpo(cfg, t)[0]
        mask, kwargs = klops_grpo_kwargs(cfg, t)
        kwargs["num_items"] = None
        if loss_type == "dr_grpo":
            kwargs["max_completion_length"] = None
            cfg_l = dict(cfg, max_completion_length=L)
            loss = trl_grpo(cfg_l, t)[0]
        got, _ = klops.grpo_loss(t["logp"], t["advantages"], mask, entropy=t["entropy"], **kwargs)
        assert_matches(f"{loss_type} default normalizer", got, loss)


def test_grpo_defaults_follow_trl():
    """klops.grpo_loss's defaults are GRPOConfig's, but for use_bias_correction_kl (documented)."""
    fields = GRPOConfig.__dataclass_fields__
    defaults = {name: p.default for name, p in inspect.signature(klops.grpo_loss).parameters.items()}
    pairs = dict(
        loss_type="loss_type",
        epsilon="epsilon",
        epsilon_high="epsilon_high",
        delta="delta",
        beta="beta",
        importance_sampling_level="importance_sampling_level",
        top_entropy_quantile="top_entropy_quantile",
        off_policy_mask_threshold="off_policy_mask_threshold",
        entropy_coef="entropy_coef",
        sapo_temperature_pos="sapo_temperature_pos",
        sapo_temperature_neg="sapo_temperature_neg",
        vespo_k_pos="vespo_k_pos",
        vespo_lambda_pos="vespo_lambda_pos",
        vespo_k_neg="vespo_k_neg",
        vespo_lambda_neg="vespo_lambda_neg",
        rollout_correction="vllm_importance_sampling_mode",
        rollout_clip_min="vllm_importance_sampling_clip_min",
        rollout_clip_max="vllm_importance_sampling_clip_max",
    )
    for ours, theirs in pairs.items():
        assert defaults[ours] == fields[theirs].default, (ours, defaults[ours], fields[theirs].default)
    assert fields["use_bias_correction_kl"].default is True and defaults["use_bias_correction_kl"] is False


# ----------------------------------------------------------------------------------------------------- DPO

P, T_DPO, DPO_PROMPT = 4, 9, 3


class LogProbModel(torch.nn.Module):
    """TRL's fused-LM-head model output: per-token log-probs of the labels (0 where the label is -100)."""

    is_gradient_checkpointing = False

    def __init__(self, token_logp):
        super().__init__()
        self.token_logp = token_logp

    def forward(self, labels, fused_lm_head, **kwargs):
        assert fused_lm_head
        keep = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.token_logp)
        return types.SimpleNamespace(
            log_probs=torch.where(keep, self.token_logp, zeros), entropy=zeros, mean_logits=zeros, is_top1=keep
        )


def dpo_tensors(seed=0, dtype=torch.float64, comonotone=False):
    """Token log-probs of P chosen and P rejected completions (rows [chosen..., rejected...]) of ragged
    lengths, for the policy and the reference. ``comonotone``: the pairs' policy and reference margins are
    in the same order, and so are the chosen and the rejected log-ratios (TRL's aot and aot_unpaired sort
    each before pairing them, which then pairs them as given)."""
    gen = torch.Generator().manual_seed(seed)
    token_logp = -(torch.rand(2 * P, T_DPO - 1, generator=gen, dtype=torch.float64) * 2 + 0.1)
    ref_token_logp = token_logp + torch.randn(2 * P, T_DPO - 1, generator=gen, dtype=torch.float64) * 0.8
    completion_mask = torch.zeros(2 * P, T_DPO, dtype=torch.int64)
    lengths = [6, 4, 5, 3, 2, 6, 4, 5]
    for i, n in enumerate(lengths):
        completion_mask[i, DPO_PROMPT : DPO_PROMPT + n] = 1
    keep = completion_mask[:, 1:].double()
    if comonotone:  # shift the reference so that the log-ratios of chosen and of rejected rise with the margin

        def seq(x, rows):
            return (x[rows] * keep[rows]).sum(-1)

        chosen, rejected = slice(0, P), slice(P, 2 * P)
        margin = seq(token_logp, chosen) - seq(token_logp, rejected)
        for rows, log_ratio in ((chosen, 0.8 * margin - 0.2), (rejected, 0.3 * margin)):
            shift = seq(token_logp, rows) - log_ratio - seq(ref_token_logp, rows)
            ref_token_logp[rows] += (shift / keep[rows].sum(-1))[:, None]
    return dict(
        token_logp=token_logp.to(dtype), ref_token_logp=ref_token_logp.to(dtype), completion_mask=completion_mask
    )


class DPOStub:
    """The attributes of a DPOTrainer that ``_compute_loss`` reads."""

    def __init__(self, cfg, policy, ref):
        self.model, self.ref_model = policy, ref
        self.accelerator = Accelerator()
        self.args = types.SimpleNamespace(gradient_checkpointing_kwargs=None)
        self.loss_types = cfg["loss_type"]
        self.loss_weights = [1.0] * len(self.loss_types)
        self.beta = cfg["beta"]
        self.f_divergence_type = cfg["f_divergence_type"]
        self.f_alpha_divergence_coef = cfg["f_alpha_divergence_coef"]
        self.label_smoothing = cfg["label_smoothing"]
        self.ld_alpha = None
        self.use_weighting = False
        self.precompute_ref_logps = False
        self.aux_loss_enabled = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self._tp_size = 1


def trl_dpo(cfg, t):
    """(loss, d/d token log-probs, logged metrics) from TRL's DPOTrainer._compute_loss."""
    token_logp = t["token_logp"].clone().requires_grad_()
    stub = DPOStub(cfg, LogProbModel(token_logp), LogProbModel(t["ref_token_logp"]))
    mask = t["completion_mask"]
    inputs = dict(
        input_ids=torch.arange(T_DPO).repeat(2 * P, 1), attention_mask=torch.ones_like(mask), completion_mask=mask
    )
    loss = DPOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)
    return loss, *grads(loss, token_logp), stub._metrics["train"]


DIVERGENCES = {"reverse_kl": "reverse", "forward_kl": "forward", "js_divergence": "jsd", "alpha_divergence": "alpha"}


def klops_dpo(cfg, t):
    """klops.dpo_loss on the same tokens: sequence log-probs are masked sums (IPO: means, as TRL divides
    its scores by the completion's token count); TRL's aot with comonotone margins is cDPO (label_smoothing)."""
    token_logp = t["token_logp"].clone().requires_grad_()
    keep = (t["completion_mask"][:, 1:] != 0).to(token_logp.dtype)
    (loss_type,) = cfg["loss_type"]
    ours = {"aot": "sigmoid", "aot_unpaired": "sigmoid"}.get(loss_type, loss_type)
    count = keep.sum(-1).clamp(min=1) if ours == "ipo" else 1.0
    policy = (token_logp * keep).sum(-1) / count
    ref = (t["ref_token_logp"] * keep).sum(-1) / count
    options = dict(
        beta=cfg["beta"],
        loss_type=ours,
        divergence=DIVERGENCES[cfg["f_divergence_type"]],
        alpha=cfg["f_alpha_divergence_coef"],
        label_smoothing=cfg["label_smoothing"],
    )
    loss, metrics = klops.dpo_loss(policy[:P], policy[P:], ref[:P], ref[P:], **options)
    return loss, *grads(loss, token_logp), metrics


def dpo_cases():
    for loss_type in ("sigmoid", "hinge", "ipo"):
        for divergence in DIVERGENCES if loss_type != "ipo" else ("reverse_kl",):
            alphas = (0.5, 0.3, 1.7, 1.0) if divergence == "alpha_divergence" else (0.5,)
            for alpha in alphas:
                yield pytest.param(loss_type, divergence, alpha, 0.0, id=f"{loss_type}-{divergence}-{alpha}")
    for loss_type in ("aot", "aot_unpaired"):
        for smoothing in (0.0, 0.1, 0.3):
            yield pytest.param(loss_type, "reverse_kl", 0.5, smoothing, id=f"{loss_type}-smoothing{smoothing}")


@pytest.mark.parametrize("loss_type, divergence, alpha, label_smoothing", list(dpo_cases()))
def test_dpo_matches_trl(loss_type, divergence, alpha, label_smoothing):
    # TRL's alpha divergence takes fp16 / bf16 / fp32 log-probs only (its clamp table has no float64).
    dtype = torch.float32 if divergence == "alpha_divergence" else torch.float64
    t = dpo_tensors(dtype=dtype, comonotone=loss_type.startswith("aot"))
    # a beta under which hinge's margins straddle 1 and IPO's target 1 / (2 beta) lies among the deltas
    beta = {"hinge": 2.0, "ipo": 2.0}.get(loss_type, 0.3)
    cfg = dict(
        loss_type=[loss_type],
        beta=beta,
        f_divergence_type=divergence,
        f_alpha_divergence_coef=alpha,
        label_smoothing=label_smoothing,
    )
    loss, grad, logged = trl_dpo(cfg, t)
    got, got_grad, metrics = klops_dpo(cfg, t)
    # klops computes in fp32 (TRL in the inputs' dtype): fp32 tolerances
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    assert_matches("loss", got, loss, tol)
    assert_matches("d loss / d token logp", got_grad, grad, tol)
    assert grad.abs().sum() > 0
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        if loss_type == "ipo":
            break  # TRL's rewards are beta times the summed log-ratios; klops's here the averaged ones
        assert_matches(name, metrics[name], logged[name][-1], METRIC if dtype == torch.float64 else tol)
    if loss_type == "hinge":  # both sides of the hinge
        assert 0 < (grad.abs().sum(-1)[:P] > 0).sum() < P
    if label_smoothing > 0:  # and the smoothing matters
        off, off_grad, _ = klops_dpo(dict(cfg, label_smoothing=0.0), t)
        assert not close(off, loss, tol)


def test_dpo_perturbed_klops_fails():
    """The DPO comparison notices a 1e-4 relative change of one token log-prob and a beta off by 1%."""
    cfg = dict(
        loss_type=["sigmoid"],
        beta=0.3,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        label_smoothing=0.0,
    )
    t = dpo_tensors()
    loss, grad, _ = trl_dpo(cfg, t)
    tol = dict(rtol=2e-6, atol=1e-7)
    bumped = dict(t, token_logp=t["token_logp"].clone())
    bumped["token_logp"][0, DPO_PROMPT] *= 1 + 1e-4
    assert not close(klops_dpo(cfg, bumped)[0], loss, tol)
    assert not close(klops_dpo(dict(cfg, beta=0.303), t)[0], loss, tol)


def test_ipo_divides_scores_by_token_count():
    """TRL's IPO divides each sequence's score by its completion's token count: klops's ipo on summed
    log-probs differs, on averaged ones (sequence_logprobs(average=True)) it matches (test above)."""
    t = dpo_tensors()
    cfg = dict(
        loss_type=["ipo"], beta=2.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, label_smoothing=0.0
    )
    loss = trl_dpo(cfg, t)[0]
    keep = (t["completion_mask"][:, 1:] != 0).double()
    policy, ref = (t["token_logp"] * keep).sum(-1), (t["ref_token_logp"] * keep).sum(-1)
    summed, _ = klops.dpo_loss(policy[:P], policy[P:], ref[:P], ref[P:], beta=2.0, loss_type="ipo")
    assert not close(summed, loss, dict(rtol=1e-3, atol=0))


def test_dpo_defaults_follow_trl():
    fields = DPOConfig.__dataclass_fields__
    defaults = {name: p.default for name, p in inspect.signature(klops.dpo_loss).parameters.items()}
    assert defaults["beta"] == fields["beta"].default
    assert [defaults["loss_type"]] == fields["loss_type"].default_factory()
    assert DIVERGENCES[fields["f_divergence_type"].default] == defaults["divergence"]
    assert defaults["alpha"] == fields["f_alpha_divergence_coef"].default
    assert defaults["label_smoothing"] == fields["label_smoothing"].default
