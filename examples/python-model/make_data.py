"""Writes a synthetic support-ticket dataset for the example model:
train.csv (label,text), test.csv (label,text) and texts.txt (test texts).

    python3 make_data.py OUT_DIR [--rows 3000] [--seed 1]
"""

import argparse
import csv
import pathlib
import random

TOPICS = {
    "billing": "invoice charge refund payment card billed twice subscription price receipt overcharged plan",
    "technical": "error crash login password app bug screen loading update freezes reset server timeout",
    "shipping": "parcel delivery courier tracking package arrived late address shipped box lost warehouse",
}
COMMON = "hello please help thanks my the a is not with order account today again why can you".split()


def ticket(rng, label):
    words = rng.sample(TOPICS[label].split(), 2) + rng.sample(COMMON, 5)
    # Noise, so the task is not trivial: words from another topic.
    other = rng.choice([t for t in TOPICS if t != label])
    words += rng.sample(TOPICS[other].split(), rng.choice([0, 1, 2]))
    rng.shuffle(words)
    return " ".join(words)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    labels = sorted(TOPICS)

    def write(name, n):
        rows = [(label, ticket(rng, label)) for label in (rng.choice(labels) for _ in range(n))]
        with open(args.out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "text"])
            w.writerows(rows)
        return rows

    write("train.csv", args.rows)
    test = write("test.csv", max(args.rows // 10, 30))
    (args.out / "texts.txt").write_text("".join(text + "\n" for _, text in test))


if __name__ == "__main__":
    main()
