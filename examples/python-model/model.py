"""A small, real text classifier served by aipod: multinomial naive Bayes
over word counts, in pure Python.

Functions (served with ``aipod-runtime --model exec:python3 model.py``):

- ``train``: payload = CSV with a header row and columns ``label,text``.
  Learns in ``epochs`` rounds, each adding one shard of the shuffled rows
  to the word counts (progress and held-out accuracy per round, so the log
  is a learning curve), smooths with ``alpha``, writes the
  model file as the result payload and, when the worker was started with
  ``--weights FILE``, saves it there too (atomically) for ``predict``.
- ``predict``: payload = one text per line. Uses the weights file, loaded
  once per worker and reloaded only when the file changes. The result
  payload is ``label,score`` per input line (a CSV); the JSON result counts
  the labels and shows the first few predictions.
- ``log``: the training log of the loaded model (per epoch: rows, accuracy).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import random
import re
import sys
import time

try:
    from aipod.worker import Error, Result, serve
except ImportError:  # running from a checkout without `pip install sdk/python`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "sdk" / "python"))
    from aipod.worker import Error, Result, serve

FORMAT = "aipod-example-naive-bayes/1"
TOKEN = re.compile(r"[a-z0-9']+")
PREVIEW = 5


def whole(value: object, name: str, low: int, high: int) -> None:
    """Raises INVALID_ARGUMENT unless `value` is a whole number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Error("INVALID_ARGUMENT", f"{name} must be a whole number from {low} to {high}, not {str(value)[:40]!r}")


def number(value: object, name: str, low: float, high: float) -> None:
    """Raises INVALID_ARGUMENT unless `value` is a number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise Error("INVALID_ARGUMENT", f"{name} must be a number from {low:g} to {high:g}, not {str(value)[:40]!r}")


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


class NaiveBayes:
    """Word counts per label; log-probabilities computed on load."""

    def __init__(self, doc: dict):
        if doc.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model file")
        self.doc = doc
        alpha = doc["alpha"]
        vocab = len(doc["vocabulary"])
        total_docs = sum(doc["docs"].values())
        self.prior = {c: math.log(n / total_docs) for c, n in doc["docs"].items()}
        self.word = {}
        self.unseen = {}
        for c, counts in doc["counts"].items():
            total = sum(counts.values()) + alpha * vocab
            self.word[c] = {w: math.log((n + alpha) / total) for w, n in counts.items()}
            self.unseen[c] = math.log(alpha / total)

    def classify(self, text: str) -> tuple[str, float]:
        words = tokens(text)
        scores = {
            c: self.prior[c] + sum(self.word[c].get(w, self.unseen[c]) for w in words)
            for c in self.prior
        }
        best = max(scores, key=scores.get)
        # Probability of the best label (softmax of the log scores).
        top = scores[best]
        norm = sum(math.exp(s - top) for s in scores.values())
        return best, 1.0 / norm


class Model:
    def __init__(self, weights: pathlib.Path | None):
        self.weights = weights
        self.loaded: NaiveBayes | None = None
        self.loaded_stamp = None
        self._load()  # once per worker, at start (if the file exists)

    # -- train -------------------------------------------------------------

    def train(self, ctx, path, epochs: int = 5, alpha: float = 1.0, holdout: float = 0.1, seed: int = 7):
        # Checked before any work, as an example should: a wrong type is the
        # caller's error (INVALID_ARGUMENT), never a crash of the worker.
        whole(epochs, "epochs", 1, 100)
        number(alpha, "alpha", 1e-9, 1e6)
        number(holdout, "holdout", 0.0, 0.9)
        whole(seed, "seed", 0, 2**63 - 1)
        rows = self._read_rows(path)
        random.Random(seed).shuffle(rows)
        cut = int(len(rows) * holdout)
        held, rows = rows[:cut], rows[cut:]
        labels = sorted({label for label, _ in rows})
        if len(labels) < 2:
            raise Error("INVALID_ARGUMENT", f"training needs at least two labels; found {labels}")

        doc = {"format": FORMAT, "alpha": alpha, "docs": {c: 0 for c in labels},
               "counts": {c: {} for c in labels}, "vocabulary": [], "log": []}
        vocabulary: set[str] = set()
        shard = math.ceil(len(rows) / epochs)
        started = time.monotonic()
        for epoch in range(1, epochs + 1):
            if ctx.cancelled:
                raise Error("CANCELLED", f"training cancelled in epoch {epoch}")
            for label, text in rows[(epoch - 1) * shard: epoch * shard]:
                doc["docs"][label] += 1
                counts = doc["counts"][label]
                for w in tokens(text):
                    counts[w] = counts.get(w, 0) + 1
                    vocabulary.add(w)
            doc["vocabulary"] = sorted(vocabulary)
            accuracy = self._accuracy(NaiveBayes(doc), held) if held else None
            entry = {"epoch": epoch, "rows_seen": min(epoch * shard, len(rows)), "heldout_accuracy": accuracy,
                     "seconds": round(time.monotonic() - started, 3)}
            doc["log"].append(entry)
            shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
            ctx.progress(epoch / epochs, f"epoch {epoch}/{epochs}: held-out accuracy {shown}")
            ctx.log(f"epoch {epoch}/{epochs}: {entry['rows_seen']} rows, held-out accuracy {shown}")

        doc["trained"] = {"rows": len(rows), "heldout_rows": len(held), "labels": labels, "epochs": epochs,
                          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        out = ctx.output_dir / "model.json"
        out.write_text(json.dumps(doc))
        if self.weights is not None:
            tmp = self.weights.with_name(self.weights.name + ".part")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.weights)
            self._load()
        final = doc["log"][-1]["heldout_accuracy"]
        return Result({"labels": labels, "rows": len(rows), "heldout_accuracy": final,
                       "vocabulary": len(vocabulary), "saved_to": str(self.weights) if self.weights else None},
                      file=out)

    @staticmethod
    def _read_rows(path) -> list[tuple[str, str]]:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["label", "text"]:
                raise Error("INVALID_ARGUMENT", "the payload must be a CSV whose header is: label,text")
            rows = []
            for n, row in enumerate(reader, start=2):
                if len(row) < 2 or not row[0].strip():
                    raise Error("INVALID_ARGUMENT", f"CSV line {n}: expected label,text")
                rows.append((row[0].strip(), row[1]))
        if not rows:
            raise Error("INVALID_ARGUMENT", "the CSV has no rows")
        return rows

    @staticmethod
    def _accuracy(model: NaiveBayes, rows) -> float:
        right = sum(1 for label, text in rows if model.classify(text)[0] == label)
        return round(right / len(rows), 4)

    # -- predict -----------------------------------------------------------

    def predict(self, ctx, path):
        model = self._model()
        out = ctx.output_dir / "predictions.csv"
        counts: dict[str, int] = {}
        preview = []
        size = max(ctx.input_size, 1)
        done = 0
        with open(path, encoding="utf-8", errors="replace") as texts, open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "score"])
            for n, line in enumerate(texts):
                done += len(line)
                text = line.rstrip("\n")
                label, score = model.classify(text)
                writer.writerow([label, f"{score:.4f}"])
                counts[label] = counts.get(label, 0) + 1
                if len(preview) < PREVIEW:
                    preview.append({"text": text[:80], "label": label, "score": round(score, 4)})
                if n % 1000 == 0:
                    if ctx.cancelled:
                        raise Error("CANCELLED", "prediction cancelled")
                    ctx.progress(done / size, f"{n} lines")
        return Result({"count": sum(counts.values()), "labels": counts, "first": preview}, file=out)

    # -- log ---------------------------------------------------------------

    def log(self, ctx, path):
        model = self._model()
        return {"trained": model.doc.get("trained"), "log": model.doc["log"]}

    # -- weights -----------------------------------------------------------

    def _model(self) -> NaiveBayes:
        self._load()
        if self.loaded is None:
            if self.weights is None:
                hint = "call train first (and start the worker with --weights FILE so predict can use it)"
            else:
                hint = f"call train first: it writes {self.weights}, which predict reads"
            raise Error("FAILED_PRECONDITION", f"no model is loaded: {hint}")
        return self.loaded

    def _load(self) -> None:
        """Loads the weights file when it is new or changed since last time."""
        if self.weights is None:
            return
        try:
            st = self.weights.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self.loaded_stamp:
            return
        with open(self.weights, encoding="utf-8") as f:
            self.loaded = NaiveBayes(json.load(f))
        self.loaded_stamp = stamp
        print(f"loaded weights from {self.weights}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=pathlib.Path,
                        help="model file: loaded by predict, written by train")
    args = parser.parse_args()
    serve(Model(args.weights))


if __name__ == "__main__":
    main()
