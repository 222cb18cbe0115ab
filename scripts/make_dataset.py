"""Regenerates deltatune's bundled dataset: short customer-support messages in five intent classes.

Written for deltatune (public domain, CC0-1.0): every template and filler below was written for this
project. The output is fixed by the seed, so the committed files can be checked with
``python scripts/make_dataset.py --check``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "deltatune" / "cli" / "data"
SEED = 20261124
PER_CLASS = 80
TEST_PER_CLASS = 20

FILL = {
    "item": ["order", "package", "parcel", "delivery", "shipment", "box", "purchase"],
    "thing": ["laptop", "phone", "headset", "blender", "desk lamp", "keyboard", "coffee maker", "backpack",
              "camera", "monitor", "jacket", "pair of shoes", "speaker", "printer", "watch"],
    "when": ["yesterday", "last week", "two days ago", "this morning", "on Monday", "a month ago", "last night"],
    "money": ["twice", "the wrong amount", "an extra fee", "more than the listed price", "after I cancelled",
              "for something I never ordered", "for shipping I did not choose"],
    "app": ["the app", "the website", "the checkout page", "the mobile app", "your site", "the dashboard"],
    "error": ["crashes", "freezes", "shows a blank page", "keeps loading forever", "logs me out",
              "throws an error", "will not open"],
    "acct": ["password", "email address", "username", "phone number", "billing address", "two-factor setting"],
    "praise": ["great", "fantastic", "really helpful", "super fast", "friendly", "excellent", "amazing"],
    "team": ["support team", "delivery driver", "agent I spoke to", "staff", "customer service", "team"],
}

TEMPLATES = {
    "billing": [
        "I was charged {money} for my {thing}.",
        "Why did my card get billed {money}?",
        "My bank statement shows you took payment {money}.",
        "Please refund the charge from {when}, I was billed {money}.",
        "The invoice for my {thing} is wrong, you charged me {money}.",
        "Can you explain the payment I was charged {when}?",
        "I need a refund, the {thing} was billed {money}.",
        "There is a duplicate payment on my account from {when}.",
    ],
    "shipping": [
        "My {item} has not arrived yet, I ordered it {when}.",
        "Where is my {item}? Tracking has not moved since {when}.",
        "The {item} with my {thing} was delivered to the wrong address.",
        "When will my {thing} be shipped?",
        "The courier says my {item} was delivered {when} but nothing came.",
        "Can I change the delivery address for my {item}?",
        "My {thing} arrived damaged in the {item}.",
        "How long does it take for a {item} to reach me?",
    ],
    "technical": [
        "{app} {error} every time I try to pay.",
        "When I open {app} it {error}.",
        "I cannot finish checkout because {app} {error}.",
        "Since {when} {app} {error} on my phone.",
        "The {thing} setup page in {app} {error}.",
        "Is {app} down? It {error} for me.",
        "Every time I search for a {thing}, {app} {error}.",
        "After the update {app} {error}.",
    ],
    "account": [
        "How do I change my {acct}?",
        "I forgot my {acct} and cannot log in.",
        "Please update the {acct} on my account.",
        "I want to delete my account and all my data.",
        "Can you merge my two accounts into one?",
        "How can I turn off the {acct} on my profile?",
        "My account was locked {when} after I changed my {acct}.",
        "I cannot sign in since {when}, it says my {acct} is invalid.",
        "I never received the code to reset my {acct}.",
        "Someone changed my {acct} {when} without my permission.",
    ],
    "feedback": [
        "The {team} was {praise}, thank you!",
        "Just wanted to say the {thing} I bought is {praise}.",
        "Your {team} has been {praise} every time I call.",
        "Thanks, my {thing} arrived and it is {praise}.",
        "I love {app}, it is {praise}.",
        "Big thanks to the {team}, truly {praise} service.",
        "Honestly the best {thing} I have owned, {praise} quality.",
        "Keep it up, the {team} did a {praise} job {when}.",
    ],
}


def _expand(template: str) -> list[str]:
    keys = [k for k in FILL if "{" + k + "}" in template]
    out = []
    for combo in itertools.product(*(FILL[k] for k in keys)):
        out.append(template.format(**dict(zip(keys, combo))))
    return out


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    train, test = [], []
    for label, templates in TEMPLATES.items():
        # Templates are split between train and test, so the test set asks for generalisation to new
        # phrasings, not only new fillers.
        test_templates = templates[-2:]
        pools = {
            "train": sorted({s for t in templates[:-2] for s in _expand(t)}),
            "test": sorted({s for t in test_templates for s in _expand(t)}),
        }
        train += [{"text": s, "label": label} for s in rng.sample(pools["train"], PER_CLASS - TEST_PER_CLASS)]
        test += [{"text": s, "label": label} for s in rng.sample(pools["test"], TEST_PER_CLASS)]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="verify the committed files instead of writing")
    args = parser.parse_args()
    train, test = build()
    for name, rows in (("train", train), ("test", test)):
        path = OUT / f"support_intents_{name}.jsonl"
        if args.check:
            assert path.read_text() == _dump(rows), f"{path} differs from the generator's output"
        else:
            path.write_text(_dump(rows))
    print(f"{len(train)} train / {len(test)} test rows, {len(TEMPLATES)} labels")


if __name__ == "__main__":
    main()
