"""PPO roles on one base: a reward-model adapter on the policy's frozen base scores as the merged RM;
a value network initialised from the RM starts at the RM's prefix scores; both train (value) or stay
frozen (reward) as they should; resume is exact; gradient accumulation equals one large minibatch."""
import os

import pytest
import torch
from conftest import read_metrics
from ppo_run import config, reward_multiple_of_4

from rlhf_engine.engine.weights.builder import build_model
from rlhf_engine.engine.weights.hf_folder import save_model_folder
from rlhf_engine.engine.weights.load import load_checkpoint
from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora, lora_layers
from rlhf_engine.engine.merge import merge
from rlhf_engine.engine.model.llama import LLaMA
from rlhf_engine.engine.ppo import train
from rlhf_engine.engine.rl.reward import reward_model_fn
from rlhf_engine.engine.rl.rollout import PolicyAndValue

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50]]
RESPONSES = [[7, 8, 9], [10, 2, 0]]  # row 1 ends with EOS (2), then one padding slot


@pytest.fixture(scope="module")
def setup(synthetic_pairs, tmp_path_factory):
    """(base, rl data, RM adapter folder trained-looking on that base, the same RM merged)."""
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.training.train_state import write_stage_model
    pairs, tok = synthetic_pairs
    folder = tmp_path_factory.mktemp("roles")
    cfg = ModelConfig.preset("tiny", vocab_size=512)
    torch.manual_seed(0)
    base = str(folder / "base")
    save_model_folder(LLaMA(cfg).init_weights(std=0.15), base, tokenizer=tok)
    rm = build_model(base, Tokenizer(tok), head="score", lora=LoRAConfig(r=4, targets=("all-linear",), dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if name.endswith("lora_b") or name == "score.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapter = str(folder / "rm")
    os.makedirs(adapter)
    write_stage_model(adapter, rm, LoRAConfig(r=4, targets=("all-linear",), dropout=0.0), tok, base_model=base)
    merged = merge(base, adapter, str(folder / "rm-merged"))
    return base, os.path.join(pairs, "rl"), adapter, merged


def batch():
    from rlhf_engine.engine.model.generate import left_pad
    tokens, mask = left_pad(PROMPTS, 0)
    full = torch.cat([tokens, torch.tensor(RESPONSES)], 1)
    full_mask = torch.cat([mask, torch.tensor([[1, 1, 1], [1, 1, 0]])], 1)
    return full, full_mask, tokens.shape[1]


def roles_for(setup, tmp_path, reward, value_model):
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.rl.roles import build_roles
    base, data, adapter, merged = setup
    cfg = config(base, data, str(tmp_path), reward_model=adapter if reward == "adapter" else merged,
                 value_model=value_model)
    tok = Tokenizer(os.path.join(base, "tokenizer.model"))
    policy = build_model(base, tok, lora=cfg.lora)
    roles = build_roles(cfg, tok, policy, torch.device("cpu"), None)
    pv = PolicyAndValue(policy, roles.value_net, roles.value_adapter, roles.value_head_init).eval()
    return pv, roles


def test_reward_reads_a_finished_answer_before_its_eos(setup):
    """The RM learnt from texts without EOS, so a finished answer is scored as its text: the EOS is left out
    (row 1); an answer the cap cut (row 0) is read at its last token."""
    tokens, mask, _ = batch()
    net = load_checkpoint(setup[3], head="score").eval()
    got = reward_model_fn(net, eos_id=2)(tokens, mask)
    text = mask.clone()
    text[1, -2] = 0  # row 1's EOS
    torch.testing.assert_close(got, reward_model_fn(net, eos_id=2)(tokens, text))
    at_eos = reward_model_fn(net, eos_id=-1)(tokens, mask)  # no token counts as EOS: row 1 read at its EOS
    assert torch.equal(got[0], at_eos[0]) and (got[1] - at_eos[1]).abs() > 1e-3


@pytest.mark.parametrize("reward", ["adapter", "merged"])
def test_reward_on_the_policy_base_scores_as_the_merged_reward_model(setup, tmp_path, reward):
    tokens, mask, _ = batch()
    pv, roles = roles_for(setup, tmp_path, reward, "head")
    want = reward_model_fn(load_checkpoint(setup[3], head="score").eval(), eos_id=2)(tokens, mask)
    got = roles.reward_fn(tokens, mask)
    assert want.abs().min() > 1e-2  # a real score, not zeros
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ("adapter 'reward' on the policy base" in roles.layout) == (reward == "adapter")
    with torch.no_grad():  # the policy itself is untouched by the reward adapter beside it
        plain = apply_lora(load_checkpoint(setup[0]).eval(), LoRAConfig(r=8, targets=("all-linear",), dropout=0))
        for (_, a), (_, b) in zip(lora_layers(plain), lora_layers(pv.policy)):
            b.adapters["default"].load_state_dict(a.adapters["default"].state_dict())
        torch.testing.assert_close(pv.policy(tokens, attention_mask=mask), plain(tokens, attention_mask=mask),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("reward", ["adapter", "merged"])
def test_value_from_the_reward_model_starts_at_its_prefix_scores(setup, tmp_path, reward):
    tokens, mask, P = batch()
    pv, roles = roles_for(setup, tmp_path, reward, "reward")
    with torch.no_grad():
        values = pv(tokens, mask, P).values
        prefix_scores = load_checkpoint(setup[3], head="score").eval()(tokens, attention_mask=mask)[:, P - 1:-1]
    real = mask[:, P:].bool()
    torch.testing.assert_close(values[real], prefix_scores[real], rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in pv.named_parameters() if p.requires_grad}
    assert any(".adapters.value." in n for n in trainable) and "value_head.weight" in trainable
    assert not any(".adapters.reward." in n for n in trainable)


def test_shared_base_ppo_trains_policy_and_value_but_never_the_reward(setup, tmp_path, monkeypatch, capsys):
    import rlhf_engine.engine.ppo as ppo
    base, data, adapter, _ = setup
    captured = {}
    real = ppo.build_roles

    def spy(cfg, tok, policy, *a):
        captured["policy"] = policy
        return real(cfg, tok, policy, *a)
    monkeypatch.setattr(ppo, "build_roles", spy)
    train(config(base, data, str(tmp_path), ppo_epochs=2, max_steps=3, reward_model=adapter, value_model="reward"),
          init_dist("cpu"))
    assert "reward = adapter 'reward' on the policy base" in capsys.readouterr().out
    policy = captured["policy"]
    layers = [m for _, m in lora_layers(policy)]
    assert all(set(m.adapters) == {"default", "reward", "value"} for m in layers)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    reward_b = [saved[f"base_model.model.{n}.lora_B.weight"] for n, _ in lora_layers(policy)]
    moved = lambda name: max((m.adapters[name].lora_b - ref).abs().max().item()  # noqa: E731
                             for m, ref in zip(layers, reward_b))
    assert moved("reward") == 0.0  # frozen
    assert moved("value") > 1e-4  # started as a copy of the reward adapter, then trained
    assert max(m.adapters["default"].lora_b.abs().max().item() for m in layers) > 1e-4  # the policy trained


def test_resume_with_a_value_adapter_equals_uninterrupted(setup, tmp_path):
    base, data, adapter, _ = setup
    kw = dict(save_every=2, keep=10, reward_model=adapter, value_model="reward")
    train(config(base, data, str(tmp_path / "full"), ppo_epochs=2, max_steps=4, **kw), init_dist("cpu"))
    part = tmp_path / "part"
    train(config(base, data, str(part), ppo_epochs=2, max_steps=2, **kw), init_dist("cpu"))
    (part / "metrics.jsonl").unlink()
    train(config(base, data, str(part), ppo_epochs=2, max_steps=4, resume=str(part / "checkpoint-000002"), **kw),
          init_dist("cpu"))
    for key in ("env/reward_mean", "ppo/policy_loss", "ppo/value_loss", "objective/kl"):
        full, resumed = read_metrics(tmp_path / "full", key), read_metrics(part, key)
        assert sorted(resumed) == [2, 3] and all(resumed[s] == full[s] for s in resumed), key


def test_gradient_accumulation_equals_one_large_minibatch(setup, tmp_path):
    from safetensors.torch import load_file
    base, data, _, _ = setup
    for name, accum in (("one", 1), ("four", 4)):
        train(config(base, data, str(tmp_path / name), mini_batch_size=8, ppo_epochs=2, max_steps=2,
                     grad_accum=accum), init_dist("cpu"),
              reward_fn=reward_multiple_of_4)
    a = load_file(tmp_path / "one" / "checkpoint-000002" / "adapter_model.safetensors")
    b = load_file(tmp_path / "four" / "checkpoint-000002" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-3  # the update did something
    for k in a:  # Adam divides by sqrt(v): round-off in a tiny gradient can move a weight by a few 1e-6
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl"):
        x, y = read_metrics(tmp_path / "one", key), read_metrics(tmp_path / "four", key)
        assert all(abs(x[s] - y[s]) <= 1e-5 * max(1.0, abs(x[s])) for s in x), key


@pytest.mark.parametrize("kw, match", [
    (dict(reward="adapter", lora=None), "can share the policy's frozen base only when the policy trains LoRA"),
    (dict(reward="scripted", value_model="reward"), "--value-model reward needs a reward model"),
    (dict(reward="merged", grad_accum=3), "must be a multiple of --grad-accum 3"),
])
def test_role_errors(setup, tmp_path, kw, match):
    base, data, adapter, merged = setup
    reward = kw.pop("reward")
    with pytest.raises(ValueError, match=match):
        train(config(base, data, str(tmp_path), mini_batch_size=kw.pop("mini_batch_size", 4), max_steps=1,
                     reward_model={"adapter": adapter, "merged": merged}.get(reward), **kw), init_dist("cpu"),
              reward_fn=reward_multiple_of_4 if reward == "scripted" else None)


def test_reward_adapter_from_another_base_is_refused(setup, tmp_path):
    import json
    import shutil
    base, data, adapter, merged = setup
    other = tmp_path / "rm"
    shutil.copytree(adapter, other)
    conf = json.loads((other / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = merged  # exists, and is not the policy's base
    (other / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="is an adapter trained on .* not on the policy's base"):
        train(config(base, data, str(tmp_path / "out"), reward_model=str(other)), init_dist("cpu"))


def second_rm_adapter(setup, folder, seed):
    """Another RM adapter on the same base (different weights): a second ensemble member."""
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.training.train_state import write_stage_model
    base = setup[0]
    tok = os.path.join(base, "tokenizer.model")
    lora = LoRAConfig(r=4, targets=("all-linear",), dropout=0.0)
    rm = build_model(base, Tokenizer(tok), head="score", lora=lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if name.endswith("lora_b") or name == "score.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    os.makedirs(folder)
    write_stage_model(str(folder), rm, lora, tok, base_model=base)
    return str(folder)


@pytest.mark.parametrize("how", ["mean", "min", "uwo"])
def test_an_ensemble_of_adapters_scores_as_its_members_combined(setup, tmp_path, how):
    """Two RM adapters on the policy's base: the ensemble's members are each adapter's own score, and its
    reward their mean, min, or mean - λ var (two members: var = ((a - b) / 2)^2), by hand."""
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.rl.roles import build_roles
    base, data, adapter, _ = setup
    other = second_rm_adapter(setup, tmp_path / "rm2", seed=5)
    tokens, mask, _ = batch()
    tok = Tokenizer(os.path.join(base, "tokenizer.model"))

    def roles(paths, **kw):
        cfg = config(base, data, str(tmp_path / "out"), reward_model=paths, **kw)
        return build_roles(cfg, tok, build_model(base, tok, lora=cfg.lora), torch.device("cpu"), None)
    a, b = (roles(path).reward_fn(tokens, mask) for path in (adapter, other))
    assert (a - b).abs().min() > 1e-3  # two different members
    ensemble = roles((adapter, other), reward_ensemble=how, uwo_lambda=0.5)
    want = {"mean": (a + b) / 2, "min": torch.minimum(a, b), "uwo": (a + b) / 2 - 0.5 * ((a - b) / 2) ** 2}[how]
    torch.testing.assert_close(ensemble.reward_fn(tokens, mask), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ensemble.reward_fn.members(tokens, mask), torch.stack([a, b]), rtol=1e-5, atol=1e-5)
    assert f"{how} of an ensemble of 2 adapters on the policy base" in ensemble.layout


def test_ppo_logs_each_member_and_their_spread(setup, tmp_path):
    base, data, adapter, merged = setup
    other = second_rm_adapter(setup, tmp_path / "rm2", seed=5)
    train(config(base, data, str(tmp_path / "out"), reward_model=(adapter, other), max_steps=1), init_dist("cpu"))
    metric = lambda key: read_metrics(str(tmp_path / "out"), key)[0]  # noqa: E731
    members = metric("env/reward_member0_mean"), metric("env/reward_member1_mean")
    assert metric("env/reward_mean") == pytest.approx(sum(members) / 2, abs=1e-6)  # the mean ensemble
    assert members[0] != members[1] and metric("env/reward_member_spread") > 0


def test_an_ensemble_refuses_a_merged_member_and_a_value_model_from_the_reward(setup, tmp_path):
    base, data, adapter, merged = setup
    with pytest.raises(ValueError, match="ensemble members must be RM adapter folders"):
        train(config(base, data, str(tmp_path / "a"), reward_model=(adapter, merged)), init_dist("cpu"))
    with pytest.raises(ValueError, match="--value-model reward starts the critic from one reward model"):
        config(base, data, str(tmp_path / "b"), reward_model=(adapter, adapter), value_model="reward")
