"""A worker model for the runtime's integration tests (uses the Python SDK
from this checkout). Flags: --init-delay SECONDS, --shutdown-marker FILE."""

import argparse
import asyncio
import os
import pathlib
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "sdk" / "python"))

from aipod.worker import Result, serve  # noqa: E402


class Model:
    def __init__(self, shutdown_marker):
        self.shutdown_marker = shutdown_marker

    def echo(self, ctx, path, **kwargs):
        print("a print() in the model, which must not break the protocol")
        out = ctx.output_dir / "echo.bin"
        out.write_bytes(path.read_bytes())
        return Result({"kwargs": kwargs, "size": path.stat().st_size, "input_size": ctx.input_size}, file=out)

    def pid(self, ctx, path):
        return {"pid": os.getpid(), "worker": os.environ.get("AIPOD_WORKER_INDEX")}

    def traced(self, ctx, path):
        return {"traceparent": ctx.traceparent}

    def slow(self, ctx, path, seconds=1.0, marker=None):
        print(f"slow started for {seconds}s", file=sys.stderr, flush=True)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            if ctx.cancelled:
                if marker:
                    pathlib.Path(marker).write_text("cancelled")
                return {"cancelled": True}
            ctx.progress(elapsed / seconds, f"step {int(elapsed * 10)}")
            time.sleep(0.02)
        return {"slept": seconds, "pid": os.getpid()}

    def counted(self, ctx, path, counter, seconds=1.0):
        """Appends a line to `counter` each time it runs, then works like
        `slow`: how a test proves a model ran exactly once."""
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if ctx.cancelled:
                return {"cancelled": True}
            time.sleep(0.02)
        return {"runs": len(pathlib.Path(counter).read_text().splitlines()), "size": path.stat().st_size}

    def slow_echo(self, ctx, path, seconds=1.0):
        """Returns the payload as the result payload after `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not ctx.cancelled:
            time.sleep(0.02)
        out = ctx.output_dir / "echo.bin"
        out.write_bytes(path.read_bytes())
        return Result({"size": path.stat().st_size}, file=out)

    def stubborn(self, ctx, path, seconds=60.0):
        """Ignores cancellation: only a kill stops it."""
        print("stubborn started", file=sys.stderr, flush=True)
        time.sleep(seconds)
        return {"slept": seconds}

    def big_result(self, ctx, path, size=0):
        """A result JSON of about `size` bytes."""
        return {"s": "x" * size}

    def late_progress(self, ctx, path, after=0.3):
        """Returns at once, and reports progress for this finished call
        `after` seconds later, from a thread (while another call runs)."""
        import threading

        def later():
            time.sleep(after)
            ctx.progress(1.0, "too late")

        threading.Thread(target=later, daemon=True).start()
        return {"returned": True}

    def crash(self, ctx, path):
        print("about to crash", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def escape(self, ctx, path):
        return Result({}, file=__file__)

    async def double(self, ctx, path, x=0):
        await asyncio.sleep(0.01)
        return {"double": 2 * x}

    def close(self):
        if self.shutdown_marker:
            pathlib.Path(self.shutdown_marker).write_text("closed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--init-delay", type=float, default=0.0)
    parser.add_argument("--shutdown-marker")
    args = parser.parse_args()
    time.sleep(args.init_delay)  # "loading weights"
    serve(Model(args.shutdown_marker))
