"""A worker model that writes to stdout at every moment a real ML library
might: at import, in its constructor, from C-level writes without a newline,
and during a call."""

import os
import pathlib
import sys

print("importing noisy model: loading tokenizer")   # at import, before serve()
os.write(1, b"C extension banner without a newline... ")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "sdk" / "python"))
from aipod.worker import serve  # noqa: E402


class Noisy:
    def __init__(self):
        print("constructing the model", flush=True)
        os.write(1, b'{"looks": "like json but is the model\'s"}')  # ends without a newline

    def shout(self, ctx, path, word: str = "hi"):
        print(f"printing during the call: {word}")
        os.write(1, b"a C write during the call\n")
        return {"word": word.upper()}


if __name__ == "__main__":
    model = Noisy()
    os.write(1, b"after the constructor, still no newline")
    serve(model)
