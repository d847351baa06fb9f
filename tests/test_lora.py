"""LoRA: zero-init no-op, trainable set, unchanged keys, merge, disable_lora, named adapters, PEFT round trips."""
import pytest
import torch

from rlhf_engine.engine.weights.adapters import load_adapter, save_adapter, write_adapter
from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.model.lora import (LoRAConfig, apply_lora, disable_lora, lora_state_dict,
                                           mark_only_lora_trainable, merge_lora, use_adapter)
from rlhf_engine.engine.model.llama import LLaMA, Linear

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96, max_seq_len=64)
TOKENS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))


def base_model(seed=0):
    return LLaMA(CFG).init_weights(generator=torch.Generator().manual_seed(seed)).eval()


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_zero_initialised_adapters_leave_outputs_unchanged():
    model = base_model()
    with torch.no_grad():
        before = model(TOKENS)
        apply_lora(model, LoRAConfig(r=4, targets=("all-linear",)))
        assert torch.equal(model.eval()(TOKENS), before)


def test_keys_unchanged_and_only_lora_trainable():
    model = base_model()
    keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(r=4))
    new_keys = set(model.state_dict())
    assert keys <= new_keys
    assert new_keys - keys == {f"model.layers.{i}.self_attn.{p}_proj.adapters.default.lora_{ab}"
                               for i in range(2) for p in "qv" for ab in "ab"}
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == new_keys - keys
    assert model.model.layers[0].self_attn.q_proj.lora_a.shape == (4, 64)
    assert model.model.layers[0].self_attn.v_proj.lora_b.shape == (32, 4)  # GQA: 2 kv heads × 16


def test_all_linear_skips_the_heads():
    model = apply_lora(base_model(), LoRAConfig(r=2, targets=("all-linear",)))
    # ...layers.<i>.<block>.<linear>.adapters.default.lora_a: the linear is the fourth name from the end
    adapted = [n.split(".")[-4] for n, _ in model.named_parameters() if n.endswith("lora_a")]
    assert sorted(set(adapted)) == sorted({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"})
    assert len(adapted) == 7 * model.cfg.n_layers  # every block's seven linears, once
    assert {k.split(".")[-4] for k in lora_state_dict(model)} == set(adapted)
    assert not any(n.startswith(("lm_head", "model.embed_tokens")) and "lora" in n for n, _ in model.named_parameters())
    assert type(model.lm_head) is Linear  # the plain head (llama.Linear), no adapter


def test_merge_equals_unmerged_and_is_idempotent():
    model = apply_lora(base_model(), LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))).eval()
    randomise_adapters(model)
    with torch.no_grad():
        unmerged = model(TOKENS)
        merge_lora(model)
        once = model(TOKENS)
        merge_lora(model)
        twice = model(TOKENS)
    assert (once - unmerged).abs().max().item() <= 1e-5
    assert torch.equal(once, twice)


def test_disable_lora_equals_base_and_restores_after_an_exception():
    base = base_model()
    with torch.no_grad():
        expected = base(TOKENS)
    model = apply_lora(base_model(), LoRAConfig(r=4)).eval()
    randomise_adapters(model)
    with torch.no_grad():
        adapted = model(TOKENS)
        with disable_lora(model):
            assert torch.equal(model(TOKENS), expected)
        with pytest.raises(RuntimeError, match="boom"):
            with disable_lora(model):
                raise RuntimeError("boom")
        assert torch.equal(model(TOKENS), adapted)
    assert not torch.equal(adapted, expected)


def test_lora_training_moves_only_adapters_and_lowers_the_loss():
    torch.manual_seed(0)
    model = apply_lora(base_model(), LoRAConfig(r=8, alpha=16, dropout=0.0, targets=("all-linear",)))
    mark_only_lora_trainable(model).train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        logits = model(TOKENS[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), TOKENS[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # The frozen random lm_head caps how confident the model can get (loss plateaus near 3.35 here),
    # so ask for a clear fall rather than memorisation.
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "rank r must be a positive integer"),
    (dict(r=-2), "rank r must be a positive integer"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(targets=()), "at least one layer"),
])
def test_bad_lora_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"LoRA target\(s\) \['query_key_value'\] match no linear layer"):
        apply_lora(base_model(), LoRAConfig(targets=("q_proj", "query_key_value")))


# ---- PEFT as an oracle ---------------------------------------------------------------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def hf_base(tmp_path, seed=0):
    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    save_model_folder(base_model(seed), str(tmp_path / "base"))
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()


def test_our_adapter_loads_in_peft(tmp_path):
    cfg = LoRAConfig(r=4, alpha=12, dropout=0.0, targets=("q_proj", "v_proj", "gate_proj"))
    model = apply_lora(base_model(), cfg).eval()
    randomise_adapters(model)
    save_adapter(model, cfg, str(tmp_path / "adapter"))
    hf = peft.PeftModel.from_pretrained(hf_base(tmp_path), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (model(TOKENS) - hf(TOKENS).logits).abs().max().item() <= 1e-5


def test_peft_adapter_loads_here(tmp_path):
    hf = hf_base(tmp_path)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["k_proj", "o_proj", "up_proj"],
                             task_type="CAUSAL_LM")
    hf = peft.get_peft_model(hf, config)
    randomise_adapters(hf, seed=3)  # PEFT initialises B to zero: make the adapter do something
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    hf.save_pretrained(tmp_path / "peft_adapter")
    ours, lcfg = load_adapter(base_model(), str(tmp_path / "peft_adapter"))
    assert (lcfg.r, lcfg.alpha, set(lcfg.targets)) == (8, 16.0, {"k_proj", "o_proj", "up_proj"})
    with torch.no_grad():
        assert (ours.eval()(TOKENS) - hf.eval()(TOKENS).logits).abs().max().item() <= 1e-5


def test_adapter_file_errors(tmp_path):
    cfg = LoRAConfig(r=4)
    model = apply_lora(base_model(), cfg)
    save_adapter(model, cfg, str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(base_model(), str(tmp_path))
    wide = LLaMA(ModelConfig(**{**CFG.to_dict(), "dim": 128, "n_heads": 8, "n_kv_heads": 4})).init_weights()
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \[4, 64\], the model expects \[4, 128\]"):
        load_adapter(wide, str(tmp_path / "a"))


# ---- named adapters on one base -----------------------------------------------------------------

def two_adapter_model():
    """A base with a q/v "default" adapter and an all-linear "reward" adapter, both random."""
    model = apply_lora(base_model(), LoRAConfig(r=4, targets=("q_proj", "v_proj")))
    apply_lora(model, LoRAConfig(r=2, alpha=8, targets=("all-linear",)), name="reward")
    randomise_adapters(model)
    return model


def test_each_named_adapter_equals_a_model_that_holds_only_it(tmp_path):
    model = two_adapter_model()
    save_adapter(model, LoRAConfig(r=4, targets=("q_proj", "v_proj")), str(tmp_path / "default"))
    (tmp_path / "reward").mkdir()
    write_adapter(model, LoRAConfig(r=2, alpha=8, targets=("all-linear",)), str(tmp_path / "reward"), name="reward")
    only_default, _ = load_adapter(base_model(), str(tmp_path / "default"))
    only_reward, _ = load_adapter(base_model(), str(tmp_path / "reward"))
    with torch.no_grad():
        assert torch.equal(model(TOKENS), only_default(TOKENS))  # "default" is active unless told otherwise
        with use_adapter(model, "reward"):  # gate/up/down hold only "reward": every layer switches
            assert torch.equal(model(TOKENS), only_reward(TOKENS))
        with use_adapter(model, None):
            assert torch.equal(model(TOKENS), base_model()(TOKENS))
        assert torch.equal(model(TOKENS), only_default(TOKENS))


def test_use_adapter_restores_after_an_exception():
    model = two_adapter_model()
    with torch.no_grad():
        before = model(TOKENS)
        with pytest.raises(RuntimeError):
            with use_adapter(model, "reward"):
                raise RuntimeError("boom")
        assert torch.equal(model(TOKENS), before)


def test_only_the_named_adapter_trains_and_merge_refuses_two_adapters():
    model = two_adapter_model()
    mark_only_lora_trainable(model, adapter="reward")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.reward.lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * CFG.n_layers
    with pytest.raises(ValueError, match="only a single adapter can be merged"):
        merge_lora(model)
    with pytest.raises(ValueError, match="already exists"):
        apply_lora(model, LoRAConfig(r=2), name="reward")


def test_activation_checkpointing_replays_the_adapter_the_forward_used():
    """Backward runs after use_adapter has exited; recomputed blocks must still use the adapter the
    forward ran with, or the value adapter would get the policy adapter's gradients."""
    grads = {}
    for ckpt in (False, True):
        model = two_adapter_model()
        mark_only_lora_trainable(model, adapter="reward")
        model.model.grad_checkpointing = ckpt
        with use_adapter(model, "reward"):
            loss = model(TOKENS).float().pow(2).mean()
        loss.backward()  # outside the block: "default" is active again
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_redraws_the_same_dropout_masks():
    """A recomputed block draws LoRA dropout's masks again (kernels/lora.py draws them with torch.rand): they
    must be the forward's, or the gradients would belong to other masks than the loss. Without dropout the
    same gradients; a different seed gives different ones, so the masks matter here."""
    def grads(ckpt, seed=0):
        model = apply_lora(base_model(), LoRAConfig(r=4, dropout=0.5, targets=("all-linear",)))
        randomise_adapters(model)
        model.train()
        model.model.grad_checkpointing = ckpt
        torch.manual_seed(seed)
        model(TOKENS).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, recomputed, other = grads(False), grads(True), grads(False, seed=1)
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(other[n], plain[n]) for n in plain)


def test_reward_adapter_with_its_head_loads_apart_from_the_model(tmp_path):
    """A reward model's adapter folder carries score.weight; on a policy (lm head) it comes back apart."""
    rm = apply_lora(LLaMA(CFG, head="score").init_weights(generator=torch.Generator().manual_seed(0)).eval(),
                    LoRAConfig(r=2, targets=("all-linear",)))
    randomise_adapters(rm)
    save_adapter(rm, LoRAConfig(r=2, targets=("all-linear",)), str(tmp_path / "rm"),
                 modules_to_save={"score.weight": rm.score.weight}, task_type="SEQ_CLS")
    policy = apply_lora(base_model(), LoRAConfig(r=4))
    with pytest.raises(ValueError, match="score.weight matches no parameter"):
        load_adapter(base_model(), str(tmp_path / "rm"), name="reward")
    from rlhf_engine.engine.weights.adapters import load_adapter_weights, read_adapter_config
    apply_lora(policy, read_adapter_config(str(tmp_path / "rm")), name="reward")
    extras = load_adapter_weights(policy, str(tmp_path / "rm"), name="reward", extras="return")
    assert list(extras) == ["score.weight"] and torch.equal(extras["score.weight"], rm.score.weight)
    with torch.no_grad(), use_adapter(policy, "reward"):
        hidden = policy.model(TOKENS)
        torch.testing.assert_close(hidden @ extras["score.weight"].T, rm(TOKENS)[..., None], rtol=0, atol=0)
