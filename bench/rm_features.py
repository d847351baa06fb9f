"""What a demo run's reward models pay for: each feature of the synthetic site's hidden rule, alone.

    python bench/rm_features.py --run RUN [--questions 60] [--json FILE]

RUN is a `train.py demo` folder. For its first held-out questions, templated answers ("You should clean the
{object} every week.") with one feature changed at a time (off topic: another topic's object; + steps; + polite;
+ dismissive) are scored, as PPO and eval score a finished answer, by the proxy RM (RUN/rm-merged) and the
judge (RUN/judge): the table gives each variant's mean score minus the plain on-topic answer's. The hidden rule
pays -2, +1, +1 and -2 points; a reward model that leaves "off topic" near 0 cannot see the rule's largest term.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402,F401  (binds rlhf_engine to this checkout)
from bench.common import emit_json  # noqa: E402

VARIANTS = {"off topic": dict(topic=False), "+ steps": dict(steps=True), "+ polite": dict(polite=True),
            "+ dismissive": dict(rude=True)}


def answer(keyword: str, other: str, topic=True, steps=False, polite=False, rude=False) -> str:
    from rlhf_engine.data.synthetic import POLITE, RUDE
    text = f"You should clean the {keyword if topic else other} every week."
    text += "\n\n1. First, check it gently.\n2. Then dry it & test again." if steps else ""
    return text + (f"\n\n{POLITE}" if polite else "") + (f"\n\n{RUDE}" if rude else "")


def main():
    import torch

    from rlhf_engine.data.synthetic import KEYWORDS, question_keyword
    from rlhf_engine.data.tokenizer import Tokenizer, encode_answers, format_prompt
    from rlhf_engine.engine.demo import last_checkpoint
    from rlhf_engine.engine.eval.answers import score_responses
    from rlhf_engine.engine.eval.questions import load_questions
    from rlhf_engine.engine.rl.reward import load_reward_model
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a train.py demo folder")
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--json", help="append the JSON line here too")
    args = ap.parse_args()
    tok = Tokenizer(os.path.join(args.run, "tokenizer.model"))
    questions = [q.text for q in load_questions(os.path.join(args.run, "pairs", "evaluation"), args.questions)]
    rng = random.Random(0)
    keywords = [question_keyword(q) for q in questions]
    others = [rng.choice([k for k in KEYWORDS if KEYWORDS[k] != KEYWORDS[kw]]) for kw in keywords]
    prompts = tok.encode_batch([format_prompt(q) for q in questions], bos=True)
    row = dict(bench="rm_features", run=args.run, questions=len(questions))
    for name, path in (("proxy", os.path.join(args.run, "rm-merged")),
                       ("judge", last_checkpoint(os.path.join(args.run, "judge")))):
        score = load_reward_model(path, tok, "fp32", torch.device("cpu"), False)

        def mean_score(**features) -> float:
            texts = [answer(kw, other, **features) for kw, other in zip(keywords, others)]
            responses = [a + [tok.eos_id] for a in encode_answers(tok, questions, texts)]
            scores = score_responses(score, prompts, responses, tok.pad_id, torch.device("cpu"), "fp32", 16)
            return sum(scores) / len(scores)
        plain = mean_score()
        row[name] = {variant: round(mean_score(**features) - plain, 2) for variant, features in VARIANTS.items()}
    print(f"\n{args.run}: mean score of a variant minus the plain on-topic answer's, {len(questions)} questions")
    print("| reward model | " + " | ".join(VARIANTS) + " |\n| --- |" + " --- |" * len(VARIANTS))
    for name in ("proxy", "judge"):
        print(f"| {name} | " + " | ".join(f"{row[name][v]:+.2f}" for v in VARIANTS) + " |")
    print("| hidden rule (points) | -2 | +1 | +1 | -2 |\n")
    emit_json([row], args.json)


if __name__ == "__main__":
    main()
