"""Generate data/quickstart: a small BEIR-layout dataset on which fine-tuning visibly helps.

The domain is a plant's internal runbooks. Every piece of equipment has an internal codename (a made-up
word, e.g. "Travolex"), and runbooks use only codenames; people search in plain words ("how do I
calibrate the barcode scanner"). A general-purpose model cannot know that Travolex is the barcode
scanner, so it only matches the action. Training pairs teach each codename through some of its
runbooks; the test queries ask for *other* runbooks of the same equipment, so a gain on the test split
means the model learned the vocabulary, not the answers.

Deterministic (seeded); rerun to regenerate: python data/make_quickstart.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 7
OUT = Path(__file__).parent / "quickstart"

EQUIPMENT = [
    "battery charging dock", "conveyor belt motor", "robot arm gripper", "cooling fan", "safety light curtain",
    "barcode scanner", "welding torch", "air compressor", "hydraulic press", "label printer", "vision camera",
    "emergency stop button", "forklift charger", "paint spray nozzle", "vacuum suction cup", "torque wrench",
    "temperature sensor", "pallet wrapper", "laser cutter", "water chiller", "dust extractor", "servo drive",
    "touchscreen panel", "network switch", "backup generator", "soldering station", "3d printer",
    "packaging sealer", "weighing scale", "door interlock",
]

# action: (runbook title and body, with {c} for the codename; three ways people ask, with {p} for plain words)
ACTIONS = {
    "calibrate": (
        "{c} calibration. Zero the {c} readings, compare against the reference standard and record the offsets.",
        ["how do I calibrate the {p}", "{p} calibration procedure", "the {p} readings drift, how to recalibrate"],
    ),
    "replace": (
        "Replacing a worn {c}. Isolate power, unbolt the old {c}, fit the new unit and run the acceptance check.",
        ["how to replace a broken {p}", "swap out the {p} for a new one", "{p} replacement steps"],
    ),
    "clean": (
        "{c} cleaning routine. Wipe the {c} housing, clear debris from vents and inspect seals weekly.",
        ["cleaning instructions for the {p}", "how often should the {p} be cleaned", "the {p} is dirty, how to clean it"],
    ),
    "fault": (
        "{c} fault reset. When the {c} trips, read the fault code, clear the cause and reset from the panel.",
        ["the {p} stopped with an error, how to reset it", "{p} fault code reset", "recover the {p} after a trip"],
    ),
    "firmware": (
        "{c} firmware update. Download the signed image, put the {c} in service mode and flash it.",
        ["update the software on the {p}", "{p} firmware upgrade", "how to flash new firmware to the {p}"],
    ),
    "inspect": (
        "{c} safety inspection. Check the {c} guards, labels and wiring; sign the inspection sheet.",
        ["safety check for the {p}", "{p} inspection checklist", "what to inspect on the {p} before a shift"],
    ),
    "order": (
        "Ordering {c} spare parts. Look up the {c} part number in the catalogue and raise a purchase request.",
        ["where do I order spare parts for the {p}", "{p} spare part numbers", "buy a replacement part for the {p}"],
    ),
    "install": (
        "Installing a new {c}. Mount the {c}, connect power and network, then commission it with the line lead.",
        ["how to set up a new {p}", "{p} installation guide", "commissioning a freshly delivered {p}"],
    ),
}
TEST_ACTIONS_PER_ITEM = 3  # held-out runbooks per piece of equipment: the test split


def codename(rng: random.Random, taken: set[str]) -> str:
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["x", "n", "r", "th", "l", "s", "m"]
    while True:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((2, 3)))) + rng.choice(codas)
        word = word.capitalize()
        if word not in taken:
            taken.add(word)
            return word


def main() -> None:
    rng = random.Random(SEED)
    taken: set[str] = set()
    names = {item: codename(rng, taken) for item in EQUIPMENT}
    corpus, queries, train, test = [], [], [], []
    for i, item in enumerate(EQUIPMENT):
        held_out = set(rng.sample(sorted(ACTIONS), TEST_ACTIONS_PER_ITEM))
        for action, (doc, asks) in ACTIONS.items():
            doc_id = f"d{i:02d}-{action}"
            title, body = doc.format(c=names[item]).split(". ", 1)
            corpus.append({"_id": doc_id, "title": title, "text": body})
            # test: one way of asking per held-out runbook; train: all three ways for the others
            chosen = [rng.choice(asks)] if action in held_out else asks
            for j, ask in enumerate(chosen):
                qid = f"q{i:02d}-{action}-{j}"
                queries.append({"_id": qid, "text": ask.format(p=item)})
                (test if action in held_out else train).append((qid, doc_id))
    OUT.mkdir(exist_ok=True)
    (OUT / "qrels").mkdir(exist_ok=True)
    (OUT / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (OUT / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    for split, rows in (("train", train), ("test", test)):
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, d in rows]
        (OUT / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    print(f"{OUT}: {len(corpus)} docs, {len(train)} train pairs, {len(test)} test queries")


if __name__ == "__main__":
    main()
