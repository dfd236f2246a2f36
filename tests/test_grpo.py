"""task=grpo: the loss against TRL 1.16's own `GRPOTrainer._compute_loss` on hand batches,
the advantages against TRL's formula, the reward functions (built-in, by dotted path,
per site, and what a failing one costs), sampling, and a starting adapter."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fedllm_flwr.config import load_cfg
from fedllm_flwr.data.sites import site_config
from fedllm_flwr.errors import UserError
from fedllm_flwr.tasks.grpo.losses import LOSS_TYPES, group_advantages, grpo_loss, per_token_kl
from fedllm_flwr.tasks.grpo.rewards import load_callable, resolve_rewards, score_answers
from fedllm_flwr.tasks.grpo.sampling import Group, answer_batch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(policy, old, reference, advantages, mask, *, beta, eps_low, eps_high, loss_type, max_new_tokens,
             accumulation=1, steps_per_generation=1, num_items=None):  # fmt: skip
    """TRL's `_compute_loss` on a stand-in trainer whose model returns `policy` as its
    per-token log-probs (everything TRL adds on top, off, as its defaults have it)."""
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, torch.zeros_like(policy), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=steps_per_generation),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation,
        max_completion_length=max_new_tokens, accelerator=_Accelerator(), _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
    )  # fmt: skip
    rows, width = policy.shape
    inputs = {
        "prompt_ids": torch.ones(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.ones(rows, width, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": reference,
        "num_items_in_batch": torch.tensor(float(num_items if num_items is not None else mask.sum())),
    }  # fmt: skip
    return trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)


def hand_batch(seed=0, rows=6, width=5):
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(rows, width, generator=g) * 3
    old = policy + torch.randn(rows, width, generator=g) * 0.3  # ratios off 1, some past the clip
    reference = policy + torch.randn(rows, width, generator=g) * 0.5
    advantages = torch.randn(rows, generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])[:rows]
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return policy, old, reference, advantages, mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_each_loss_type_equals_trls_own_loss_on_a_hand_batch(loss_type, beta, eps_high):
    policy, old, reference, advantages, mask = hand_batch()
    ours_in = policy.clone().requires_grad_()
    theirs_in = policy.clone().requires_grad_()
    kwargs = {"beta": beta, "eps_low": 0.2, "eps_high": eps_high, "loss_type": loss_type, "max_new_tokens": 7}
    ours = grpo_loss(ours_in, old, reference if beta else None, advantages, mask, **kwargs)
    theirs = trl_loss(theirs_in, old, reference, advantages, mask, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-7)


def test_with_one_step_per_sample_the_ratio_is_one_and_the_gradient_is_the_advantage_weighted_log_prob():
    policy, _, _, advantages, mask = hand_batch(seed=1)
    x = policy.clone().requires_grad_()
    grpo_loss(x, x.detach(), None, advantages, mask, beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="bnpo",
              max_new_tokens=5).backward()  # fmt: skip
    expected = -advantages.unsqueeze(1) * mask / mask.sum()
    torch.testing.assert_close(x.grad, expected)


def test_dapo_divides_by_the_steps_tokens_as_trl_does_under_accumulation():
    policy, old, reference, advantages, mask = hand_batch(seed=2)
    kwargs = {"beta": 0.04, "eps_low": 0.2, "eps_high": 0.2, "loss_type": "dapo", "max_new_tokens": 5}
    step_tokens = 40.0  # this micro-batch's 20 and another's 20
    ours = grpo_loss(policy, old, reference, advantages, mask, step_tokens=step_tokens, **kwargs)
    theirs = trl_loss(policy, old, reference, advantages, mask, accumulation=2, steps_per_generation=2,
                      num_items=step_tokens, **kwargs)  # fmt: skip
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_follow_trls_formula_and_a_dropped_answer_takes_no_part(scale):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 3.0])
    keep = torch.ones(12, dtype=torch.bool)
    keep[[2, 9]] = False
    ours, no_signal = group_advantages(rewards, 4, scale, keep)
    # TRL: an unscorable answer's reward is NaN, left out of nanmean and nanstd, its advantage then 0.
    r = torch.where(keep, rewards, torch.full_like(rewards, math.nan))
    mean = torch.nanmean(r.view(-1, 4), dim=1).repeat_interleave(4)
    if scale == "batch":
        std = trl_utils.nanstd(r).expand_as(r)
    else:
        std = trl_utils.nanstd(r.view(-1, 4), dim=1).repeat_interleave(4)
    theirs = r - mean if scale == "none" else (r - mean) / (std + 1e-4)
    theirs = torch.where(keep, theirs, torch.zeros_like(theirs))
    torch.testing.assert_close(ours, theirs)
    assert no_signal.view(-1, 4)[:, 0].tolist() == [False, True, False]


def test_kl_is_zero_where_policy_and_reference_agree_and_positive_elsewhere():
    policy = torch.tensor([[-1.0, -2.0, -0.5]])
    assert per_token_kl(policy, policy).abs().max() == 0
    assert (per_token_kl(policy, policy + torch.tensor([[0.3, -0.3, 1.0]])) > 0).all()


def score(fns, completions, records=None, ids=None):
    n = len(completions)
    records = records or [{"output": "x"}] * n
    ids = ids or [[5, 2]] * n
    return score_answers(fns, [], ["p"] * n, completions, ids, records, [True] * n, 8)


def test_built_in_rewards_score_what_their_benchmarks_score():
    fns = resolve_rewards(["exact_match"])
    got = score(fns, ["42.", "41", " 42\nmore"], [{"output": "42"}] * 3)
    assert got.rewards == [1.0, 0.0, 1.0] and got.keep == [True] * 3
    got = score(resolve_rewards(["gsm8k"]), ["so 3 + 4 = 7. The answer is 7.", "8"], [{"output": "... #### 7"}] * 2)
    assert got.rewards == [1.0, 0.0]
    got = score_answers(resolve_rewards(["brevity", "format"]), [2.0, 1.0], ["p"] * 2, ["ab", "a\nb"],
                        [[1, 2], [1, 2, 3, 4, 5, 6, 7, 8]], [{}] * 2, [True, False], 8)  # fmt: skip
    assert got.rewards == [2 * 0.75 + 1.0, 0.0]


def test_humaneval_reward_runs_the_records_tests_in_the_sandbox():
    record = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}
    got = score(resolve_rewards(["humaneval"]), ["    return a + b\n", "    return a - b\n"], [record] * 2)
    assert got.rewards == [1.0, 0.0]


def test_an_answer_a_reward_function_cannot_score_is_dropped_and_counted_never_a_nan_loss():
    fns = resolve_rewards(["grpo_rewards:flaky", "grpo_rewards:raises_on_long"])
    got = score(fns, ["ab", "abc", "abcd", "a", "longer", "xy"])
    assert got.keep == [False, False, False, True, False, True]
    assert got.dropped == 4 and all(math.isfinite(r) for r in got.rewards)
    assert got.reasons == {"flaky: returned a non-finite value": 1, "flaky: returned None": 1,
                           "raises_on_long: raised RuntimeError": 2}  # fmt: skip
    advantages, _ = group_advantages(torch.tensor(got.rewards), 3, "group", torch.tensor(got.keep))
    policy = torch.zeros(6, 2, requires_grad=True)
    mask = torch.ones(6, 2, dtype=torch.bool) & torch.tensor(got.keep).unsqueeze(1)
    loss = grpo_loss(policy, policy.detach(), policy.detach() - 0.1, advantages, mask, beta=0.04, eps_low=0.2,
                     eps_high=0.2, loss_type="dapo", max_new_tokens=2)  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and policy.grad[~torch.tensor(got.keep)].abs().sum() == 0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "grpo.rewards: 'no_such_module_xyz:f': module 'no_such_module_xyz' does not import"),
        ("grpo_rewards:missing", "grpo.rewards: 'grpo_rewards:missing': grpo_rewards has no callable 'missing'"),
        ("grpo_rewards:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
        ("nonsense", "'nonsense' is neither a built-in reward"),
    ],
)
def test_a_reward_path_that_does_not_import_is_one_line(spec, message):
    with pytest.raises(UserError, match=None) as caught:
        load_callable(spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert load_callable("grpo_rewards.parity").__name__ == "parity"


def test_each_site_uses_its_own_reward_functions(tiny_cfg):
    cfg = tiny_cfg("task=grpo", "grpo.client_rewards=[exact_match,exact_match+brevity]")
    one = site_config(cfg, {"partition-id": 0, "num-partitions": 2})
    two = site_config(cfg, {"partition-id": 1, "num-partitions": 2})
    own = site_config(cfg, {"partition-id": 1, "num-partitions": 2, "grpo-rewards": "format"})
    assert (one.grpo.rewards, two.grpo.rewards, own.grpo.rewards) == (["exact_match"], ["exact_match", "brevity"],
                                                                      ["format"])  # fmt: skip


def test_the_answer_batch_labels_each_answer_and_nothing_else():
    group = Group(prompts=[[1, 7, 8], [1, 9]], answers=[[4, 2], [5, 6, 6]], ended=[True, False])
    batch = answer_batch(group, pad_id=3)
    assert batch["input_ids"].tolist() == [[1, 7, 8, 4, 2], [1, 9, 5, 6, 6]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 4, 2], [-100, -100, 5, 6, 6]]


@pytest.mark.parametrize(
    "override, other",
    [("peft=prompt_tuning", "peft=prompt_tuning"), ("algorithm=zo", "algorithm=zo"),
     ("algorithm=fedot", "algorithm=fedot"), ("personalize.ft_steps=2", "personalize.ft_steps=2")],
)  # fmt: skip
def test_what_grpo_cannot_serve_is_refused_naming_both_keys(override, other):
    with pytest.raises(UserError) as caught:
        load_cfg(["task=grpo", override])
    message = str(caught.value)
    assert f"task=grpo cannot be combined with {other}" in message or (
        f"{other} cannot be combined with task=grpo" in message
    )


def _job(model_dir, out, name, *extra):
    from conftest import TINY_OVERRIDES

    return [f"model.name={model_dir}", *TINY_OVERRIDES, "train.threads=1", "log.curves=false", *extra,
            f"run.output_dir={out}", f"run.name={name}"]  # fmt: skip


def test_grpo_in_fed_from_a_tuned_adapter_with_a_reward_of_each_sites_own(
    monkeypatch, tiny_model_dir, tmp_path, task_identity
):  # fmt: skip
    """An SFT run's adapter/final starts a GRPO run; two sites reward differently
    (`--node-config grpo-rewards`); every round trains on sampled answers, reports its
    figures and keeps every guarantee of tests/invariants.py."""
    from federation import run_federation
    from invariants import check_end, check_round
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    sft = run_federation(monkeypatch, _job(tiny_model_dir, tmp_path, "sft", "num_rounds=1"), nodes=2)
    start = sft.path / "adapter" / "final"
    sites = [{"partition-id": 0, "num-partitions": 2, "grpo-rewards": "grpo_rewards:parity"},
             {"partition-id": 1, "num-partitions": 2, "grpo-rewards": "grpo_rewards:parity,brevity"}]  # fmt: skip
    run = run_federation(
        monkeypatch,
        _job(tiny_model_dir, tmp_path, "grpo", "task=grpo", "num_rounds=2", f"init.adapter={start}",
             "grpo.group_size=3", "grpo.max_new_tokens=5"),
        nodes=2, node_configs=sites, after_round=check_round,
    )  # fmt: skip
    check_end(run)
    rows = run.rows()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval-loss"] == sft.rows()[-1]["eval-loss"]  # round 0 is the SFT adapter
    for row in rows[1:]:
        assert row["clients-ok"] == 2
        assert row["grpo-answers"] == 2 * 2 * 4 * 3  # sites x local steps x prompts x group
        assert row["grpo-reward"] >= 0 and 0 <= row["grpo-no-signal"] <= 1 and row["grpo-kl"] >= 0
        assert 0 < row["grpo-answer-tokens"] <= 5 and row["grpo-dropped-answers"] == 0
        assert 0 <= row["grpo-reward-brevity"] <= 1  # only the second site rewards brevity
        assert math.isfinite(row["eval-loss"]) and 0 <= row["accuracy"] <= 1
    assert rows[2]["grpo-kl"] > 0  # the policy has moved from the base
    final = load_file(run.path / "adapter" / "final" / "adapter_model.safetensors")
    initial = load_file(start / "adapter_model.safetensors")
    assert final.keys() == initial.keys() and any(not torch.equal(final[k], initial[k]) for k in final)
    AutoPeftModelForCausalLM.from_pretrained(str(run.path / "adapter" / "final"))


def test_a_starting_adapter_that_does_not_fit_is_refused_in_one_line_before_the_run_folder(
    monkeypatch, tiny_model_dir, tmp_path, task_identity
):  # fmt: skip
    from federation import run_federation

    sft = run_federation(monkeypatch, _job(tiny_model_dir, tmp_path, "r8", "num_rounds=1", "eval.every=0"), nodes=2)
    start = sft.path / "adapter" / "final"
    for extra, message in [
        ("peft.r=4", "init.adapter=" + str(start) + ": base_model.model.model.layers.0.self_attn.q_proj.lora_A."
         "weight has shape (8, 32), this run's (4, 32) (another rank?)"),
        ("peft.target_modules=[q_proj]", "0 tensors missing and 4 unexpected"),
        ("peft=ia3", "a LORA adapter, and this run trains IA3"),
    ]:  # fmt: skip
        with pytest.raises(UserError) as caught:
            run_federation(monkeypatch, _job(tiny_model_dir, tmp_path, "bad", f"init.adapter={start}", extra), nodes=2)
        assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="no adapter_model.safetensors and adapter_config.json there"):
        run_federation(monkeypatch, _job(tiny_model_dir, tmp_path, "bad", f"init.adapter={tmp_path}"), nodes=2)
    assert not (tmp_path / "bad").exists()


def test_a_reward_that_does_not_import_stops_the_run_before_anything_trains(
    monkeypatch, tiny_model_dir, tmp_path, task_identity
):  # fmt: skip
    from federation import run_federation

    for extra in ("grpo.rewards=[no_such_module_xyz:f]", "grpo.client_rewards=[exact_match,exact_match+nope.mod:g]"):
        with pytest.raises(UserError) as caught:
            run_federation(monkeypatch, _job(tiny_model_dir, tmp_path, "bad", "task=grpo", extra), nodes=2)
        assert "does not import" in str(caught.value) and "\n" not in str(caught.value)
        assert not (tmp_path / "bad").exists()


def test_the_studys_tables_are_written_from_its_results_file():
    """The results page asks for the table by name; the build writes it from
    benchmarks/results/grpo.json (every seed's job and both two-site scenarios in it)."""
    import json

    from conftest import ROOT, docs_hooks

    results = json.loads((ROOT / "benchmarks" / "results" / "grpo.json").read_text())
    page = (ROOT / "docs" / "results" / "features.md").read_text()
    assert "<!-- generated: grpo -->" in page
    rendered = docs_hooks().render(page)
    assert len(results["arms"]["grpo"]) == len(results["arms"]["sft"]) == len(results["seeds"]) == 3
    assert set(results["sites"]) == {"local", "fed"}
    for arm in results["arms"]:
        assert f"| {arm} |" in rendered
    assert "| local |" in rendered and "| fed |" in rendered
