"""`--help` is a contract: every stage's flags come from its config, every flag reaches a config field,
and every config field is read when the stage runs (a field the stage ignored would be a lying flag)."""
import dataclasses
import inspect
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import pytest

import train
from rlhf_engine.engine.flags import config_from_args, config_parser
from rlhf_engine.engine.model.generate import SamplingConfig
from rlhf_engine.engine.model.lora import LoRAConfig


@dataclass(frozen=True)
class Inner:
    r: int = field(default=4, metadata={"help": "rank"})
    names: tuple[str, ...] = field(default=("a", "b"), metadata={"help": "names"})


@dataclass(frozen=True)
class Outer:
    data: str = field(default=None, metadata={"help": "input"})
    steps: int = field(default=10, metadata={"help": "steps"})
    fast: bool = field(default=False, metadata={"help": "go fast"})
    inner: Inner | None = field(default=Inner(), metadata={"help": "use inner", "prefix": "in_"})


def parse(cls, *argv):
    return config_from_args(cls, config_parser(cls).parse_args(list(argv)))


def test_flags_build_nested_and_optional_configs():
    assert parse(Outer, "--data", "x") == Outer(data="x")
    assert parse(Outer, "--data", "x", "--in-r", "8", "--fast").inner == Inner(r=8)
    assert parse(Outer, "--data", "x", "--in-names", "c").inner == Inner(names=("c",))
    assert parse(Outer, "--data", "x", "--no-inner").inner is None
    with pytest.raises(ValueError, match="--in-r has no effect with --no-inner"):
        parse(Outer, "--data", "x", "--no-inner", "--in-r", "8")


def test_help_lists_required_flags_first_and_defaults_as_typed():
    text = config_parser(Outer, prog="x").format_help()
    assert text.startswith("usage: x [-h] --data DATA [--steps STEPS]")
    body = text[text.index("\n\n"):]
    assert body.index("required:") < body.index("--data") < body.index("options:") < body.index("--steps")
    assert text.count("options:") == 1
    assert "(default: a b)" in text and "(default: off)" in text and "('a', 'b')" not in text


def test_the_rm_keeps_its_own_lora_defaults():
    from rlhf_engine.engine.rm import RMConfig
    cfg = parse(RMConfig, "--model", "m", "--out", "o", "--data", "d", "--lora-r", "4")
    assert cfg.lora == LoRAConfig(r=4, dropout=0.1)  # StackLLaMA's RM dropout survives a changed rank


def flattened_fields(cls, prefix="", defaults=None):
    """{flag dest: (path of attribute names, type, default)} of a config class, nested configs flattened."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else None)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) == 1 and typing.get_origin(hint) in (typing.Union, types.UnionType)
        inner = args[0] if optional else hint
        if dataclasses.is_dataclass(inner):
            if optional:
                out[prefix + f.name] = ((f.name,), "toggle", default is not None)
            nested = flattened_fields(inner, f.metadata.get("prefix", f"{f.name}_"), default or inner())
            out.update({dest: ((f.name, *path), kind, d) for dest, (path, kind, d) in nested.items()})
        else:
            out[prefix + f.name] = ((f.name,), inner, default)
    return out


def candidates(kind, default, choices):
    """Values different from the default that a flag could take, most likely valid first."""
    if choices:
        return [c for c in choices if c != default]
    if kind is int:
        return [v for v in (2 * default, default + 1, 2, 1) if v != default] if default is not None else [2]
    if kind is float:
        return [v for v in (2 * default, default / 2, 0.5, 1e-9) if v != default] if default is not None else [0.5]
    if typing.get_origin(kind) is tuple:
        return [("q_proj",), ("finetune=1.0",), ("x", "y")]
    return ["some/path", "m"]  # "m": a --models name, for --baseline


REQUIRED = {"model": "m", "out": "o", "data": "d", "reward_model": "r", "base": "b", "adapter": "a",
            "posts": ("p.xml",), "models": ("m",), "judges": ("j",), "eval_data": "e",
            "proxy": "p"}  # eval --best-of needs a proxy to pick with


@pytest.mark.parametrize("stage", list(train.STAGES))
def test_every_flag_reaches_the_config(stage):
    config_cls, _ = train.STAGES[stage].load()
    parser = train.build_parser(stage)
    sub = next(a for a in parser._actions if a.dest == "stage").choices[stage]
    fields = flattened_fields(config_cls)
    actions = [a for a in sub._actions if a.dest != "help"]
    assert {a.dest for a in actions} == set(fields)  # one flag per field, nothing else
    base = [x for name, v in REQUIRED.items() if name in fields
            for x in ([f"--{name.replace('_', '-')}"] + list(v if isinstance(v, tuple) else [v]))]
    for action in actions:
        path, kind, default = fields[action.dest]
        flag = action.option_strings[0]
        if kind in (bool, "toggle"):
            tries = [([flag], True), ([f"--no-{flag[2:]}"], False)]
        else:
            tries = [([flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)], v)
                     for v in candidates(kind, default, action.choices)]
        for extra, value in tries:
            try:
                cfg = config_from_args(config_cls, sub.parse_args(base + extra))
            except ValueError:
                continue
            got = cfg
            for p in path:
                got = getattr(got, p) if got is not None else None
            if kind == "toggle":  # --lora / --no-lora: the nested config is there or None
                got = got is not None
            if got == value:
                break
        else:
            pytest.fail(f"{stage} {flag}: no value given on the command line reached the config")


class Recorder:
    """Wraps a config so that reads of its fields are recorded (reads made by dataclasses' own
    helpers, such as asdict for the logged config, do not count as the stage reading a field)."""

    def __init__(self, cfg):
        self.read = set()
        names = {f.name for f in dataclasses.fields(cfg)}
        read = self.read

        class Recorded(type(cfg)):
            def __getattribute__(self, name):
                if name in names and not sys._getframe(1).f_code.co_filename.endswith("dataclasses.py"):
                    read.add(name)
                return object.__getattribute__(self, name)
        Recorded.__name__ = type(cfg).__name__
        self.cfg = Recorded(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
        read.clear()  # validation in __post_init__ is not the stage reading the flag

    def unread(self):
        return {f.name for f in dataclasses.fields(self.cfg)} - self.read


@pytest.fixture(scope="module")
def tiny_base(synthetic_pairs, ppo_base, tmp_path_factory):
    """The synthetic data, a tiny random LLaMA checkpoint and a reward model made from it."""
    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    from rlhf_engine.engine.weights.load import load_checkpoint
    pairs, tok = synthetic_pairs
    rm = str(tmp_path_factory.mktemp("flags") / "rm")
    save_model_folder(load_checkpoint(ppo_base[0], head="score"), rm, tokenizer=tok, pad_token_id=0)
    return pairs, tok, ppo_base[0], rm


def stage_configs(tiny_base, tmp_path):
    from rlhf_engine.data.synthetic import write_synthetic_posts
    from rlhf_engine.engine.weights.adapters import save_adapter
    from rlhf_engine.engine.weights.load import load_checkpoint
    from rlhf_engine.engine.model.lora import apply_lora
    pairs, tok, base, rm = tiny_base
    posts = write_synthetic_posts(tmp_path / "site" / "Posts.xml", 60, seed=0)
    lora = LoRAConfig(r=2, targets=("all-linear",))
    save_adapter(apply_lora(load_checkpoint(base), lora), lora, str(tmp_path / "adapter"), base_model=base)
    common = dict(seed=1, log_every=1, save_every=1, keep=1, device="cpu")
    return {
        "prepare": dict(out=str(tmp_path / "pairs"), posts=(str(posts),), progress_seconds=1e9, workers=1),
        "tokenizer": dict(data=(os.path.join(pairs, "finetune"),), vocab_size=400, out=str(tmp_path / "t.model"),
                          max_texts=200),
        "sft": dict(model=base, data=os.path.join(pairs, "finetune"), out=str(tmp_path / "sft"), seq_len=32,
                    batch_size=2, max_steps=2, eval_every=1, eval_batches=1, **common),
        "rm": dict(model=base, data=os.path.join(pairs, "reward"), out=str(tmp_path / "rm"), batch_size=2,
                   epochs=0.01, eval_every=1, eval_batches=1, **common),  # --max-steps 0: steps from --epochs
        "dpo": dict(model=base, data=os.path.join(pairs, "reward"), out=str(tmp_path / "dpo"), batch_size=2,
                    epochs=0.01, eval_every=1, eval_batches=1, **common),  # --max-steps 0: steps from --epochs
        "merge": dict(base=base, adapter=str(tmp_path / "adapter"), out=str(tmp_path / "merged")),
        "ppo": dict(model=base, reward_model=rm, data=os.path.join(pairs, "rl"), out=str(tmp_path / "ppo"),
                    batch_size=2, mini_batch_size=2, ppo_epochs=1, max_steps=2, response_min_length=2,
                    response_max_length=3, sample_every=1, eval_every=1, eval_data=os.path.join(pairs, "evaluation"),
                    eval_prompts=2, judge=rm, **common),
        "eval": dict(models=(f"base={base}", f"tuned={tmp_path / 'adapter'}"), judges=(rm,), proxy=rm, baseline="base",
                     data=os.path.join(pairs, "evaluation"), out=str(tmp_path / "eval"), num_prompts=3, bootstrap=20,
                     examples=1, device="cpu", sampling=SamplingConfig(max_new_tokens=3)),
        "generate": dict(model=base, prompt=("how do i",)),
        # One split only: the synthetic site repeats question texts under other ids, across splits.
        "check": dict(model=base, adapter=str(tmp_path / "adapter"), reward_model=rm, data=os.path.join(pairs, "rl"),
                      device="cpu", seed=1, prompts=2, max_new_tokens=4),
    }


@pytest.mark.parametrize("stage", ["prepare", "tokenizer", "sft", "rm", "dpo", "merge", "ppo", "eval", "generate",
                                   "check"])
def test_every_config_field_is_read_by_its_stage(stage, tiny_base, tmp_path, capsys):
    config_cls, run = train.STAGES[stage].load()
    recorder = Recorder(config_cls(**stage_configs(tiny_base, tmp_path)[stage]))
    assert run(recorder.cfg) == 0
    assert recorder.unread() == set(), f"{stage} never reads these flags"


def test_the_demo_reads_its_flags():
    """The demo takes minutes; its three fields are checked in its source instead."""
    from rlhf_engine.engine import demo
    source = inspect.getsource(demo.run)
    assert all(f"cfg.{f.name}" in source for f in dataclasses.fields(demo.DemoConfig))


def test_a_flag_that_is_never_read_is_caught(tiny_base, tmp_path):
    """The recorder sees a field the stage does not read (here, one added to the merge config)."""
    from rlhf_engine.engine import merge

    @dataclass(frozen=True)
    class Lying(merge.MergeConfig):
        compile: bool = False
    recorder = Recorder(Lying(**stage_configs(tiny_base, tmp_path)["merge"]))
    merge.run(recorder.cfg)
    assert recorder.unread() == {"compile"}


def test_ppo_help_no_longer_offers_flags_it_ignored():
    """Flags the old shared base gave PPO, which it never read, are gone from its help."""
    parser = train.build_parser("ppo")
    sub = next(a for a in parser._actions if a.dest == "stage").choices["ppo"]
    text = sub.format_help()
    for gone in ("--warmup-steps", "--min-lr"):
        assert gone not in text
    assert "--compile" in text and "decode stays eager" in " ".join(text.split())  # PPO's own, which it honours
