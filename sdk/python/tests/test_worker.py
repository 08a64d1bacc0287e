"""Unit tests for aipod.worker: the protocol driven over real pipes."""

import asyncio
import json
import os
import pathlib
import sys
import tempfile
import threading
import time
import unittest

try:  # the installed package (.ci/test installs the wheel), else the source tree
    import aipod.worker  # noqa: F401
except ImportError:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from aipod.worker import Error, Result, Worker  # noqa: E402


class Model:
    def __init__(self):
        self.closed = False

    def echo(self, ctx, path, **kwargs):
        print("a print() must not reach the protocol")
        return {"kwargs": kwargs, "size": path.stat().st_size, "function": ctx.function}

    def copy(self, ctx, path):
        out = ctx.output_dir / "copy.bin"
        out.write_bytes(path.read_bytes())
        return Result({"copied": True}, file=out)

    def slow(self, ctx, path, seconds=5.0):
        ctx.progress(0.25, "started")
        ctx.log("working", level="warning")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if ctx.cancelled:
                return {"stopped": True}
            time.sleep(0.01)
        return {"slept": seconds}

    def refuse(self, ctx, path, code="FAILED_PRECONDITION"):
        raise Error(code, "no weights loaded")

    def broken(self, ctx, path):
        return {}["missing"]

    def not_json(self, ctx, path):
        return {"x": object()}

    async def wait(self, ctx, path, seconds=0.01):
        await asyncio.sleep(seconds)
        return {"async": True, "seconds": seconds}

    def close(self):
        self.closed = True


class Harness:
    """Runs a Worker on a thread, connected to this test by two pipes."""

    def __init__(self, model, functions=None):
        to_worker_r, self._to_worker = os.pipe()
        self._from_worker, from_worker_w = os.pipe()
        self.worker = Worker(model, functions)
        reader = os.fdopen(to_worker_r, "rb")
        writer = os.fdopen(from_worker_w, "wb")
        self.status = None
        self.thread = threading.Thread(target=self._run, args=(reader, writer), daemon=True)
        self.thread.start()
        self.lines = os.fdopen(self._from_worker, "rb")
        self.dir = tempfile.TemporaryDirectory()
        self.input = pathlib.Path(self.dir.name) / "input"
        self.input.write_bytes(b"hello")
        self.out = pathlib.Path(self.dir.name) / "out"
        self.out.mkdir()

    def _run(self, reader, writer):
        self.status = self.worker.run(reader, writer)
        writer.close()

    def send(self, msg):
        os.write(self._to_worker, json.dumps(msg).encode() + b"\n")

    def recv(self):
        line = self.lines.readline()
        if not line:
            raise EOFError("worker closed its output")
        return json.loads(line)

    def call(self, function, call_id="c1", **kwargs):
        self.send({"type": "call", "id": call_id, "function": function, "kwargs": kwargs,
                   "input": str(self.input), "input_size": 5, "output_dir": str(self.out)})

    def answer(self):
        """The next result or error, skipping progress and log lines."""
        while True:
            msg = self.recv()
            if msg["type"] in ("result", "error"):
                return msg

    def close(self):
        os.close(self._to_worker)
        self.thread.join(5)
        self.lines.close()
        self.dir.cleanup()


class WorkerTest(unittest.TestCase):
    def setUp(self):
        self.model = Model()
        self.h = Harness(self.model)
        self.addCleanup(self.h.close)
        self.ready = self.h.recv()

    def test_ready_lists_public_methods_but_not_close(self):
        self.assertEqual(self.ready["type"], "ready")
        self.assertEqual(self.ready["protocol"], 1)
        self.assertEqual(self.ready["functions"],
                         ["broken", "copy", "echo", "not_json", "refuse", "slow", "wait"])

    def test_echo_returns_json_with_kwargs_and_input(self):
        self.h.call("echo", n=3)
        msg = self.h.answer()
        self.assertEqual(msg, {"type": "result", "id": "c1",
                               "result": {"kwargs": {"n": 3}, "size": 5, "function": "echo"}})

    def test_result_file(self):
        self.h.call("copy")
        msg = self.h.answer()
        self.assertEqual(msg["result"], {"copied": True})
        self.assertEqual(pathlib.Path(msg["output"]).read_bytes(), b"hello")

    def test_progress_and_log_carry_the_call_id(self):
        self.h.call("slow", call_id="c9", seconds=0.05)
        first, second = self.h.recv(), self.h.recv()
        self.assertEqual(first, {"type": "progress", "id": "c9", "fraction": 0.25, "message": "started"})
        self.assertEqual(second, {"type": "log", "id": "c9", "level": "warning", "message": "working"})
        self.assertEqual(self.h.answer()["result"], {"slept": 0.05})

    def test_cancel_reaches_ctx_cancelled(self):
        self.h.call("slow", seconds=30)
        self.assertEqual(self.h.recv()["type"], "progress")
        started = time.monotonic()
        self.h.send({"type": "cancel", "id": "c1"})
        msg = self.h.answer()
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((msg["type"], msg["code"]), ("error", "CANCELLED"))

    def test_cancel_for_another_call_is_ignored(self):
        self.h.call("slow", seconds=0.2)
        self.h.send({"type": "cancel", "id": "other"})
        self.assertEqual(self.h.answer()["result"], {"slept": 0.2})

    def test_errors_pick_their_code(self):
        self.h.call("refuse", code="not-found")
        msg = self.h.answer()
        self.assertEqual((msg["code"], msg["message"]), ("NOT_FOUND", "no weights loaded"))

    def test_exceptions_become_internal_with_the_message(self):
        self.h.call("broken")
        msg = self.h.answer()
        self.assertEqual(msg["code"], "INTERNAL")
        self.assertIn("KeyError", msg["message"])
        self.h.call("not_json", call_id="c2")
        msg = self.h.answer()
        self.assertEqual((msg["id"], msg["code"]), ("c2", "INTERNAL"))
        self.assertIn("not JSON", msg["message"])

    def test_bad_kwargs_are_invalid_argument(self):
        self.h.call("echo_missing")
        self.assertEqual(self.h.answer()["code"], "UNIMPLEMENTED")
        self.h.call("refuse", call_id="c2", colour="red")
        msg = self.h.answer()
        self.assertEqual(msg["code"], "INVALID_ARGUMENT")
        self.assertIn("colour", msg["message"])

    def test_async_functions_run_and_can_be_cancelled(self):
        self.h.call("wait", seconds=0.01)
        self.assertEqual(self.h.answer()["result"], {"async": True, "seconds": 0.01})
        self.h.call("wait", call_id="c2", seconds=30)
        time.sleep(0.2)
        self.h.send({"type": "cancel", "id": "c2"})
        msg = self.h.answer()
        self.assertEqual((msg["id"], msg["code"]), ("c2", "CANCELLED"))

    def test_garbage_lines_are_ignored(self):
        os.write(self.h._to_worker, b"not json\n\n{\"no_type\": 1}\n")
        self.h.call("echo")
        self.assertEqual(self.h.answer()["type"], "result")

    def test_shutdown_closes_the_model_and_ends_the_loop(self):
        self.h.send({"type": "shutdown"})
        self.h.thread.join(5)
        self.assertFalse(self.h.thread.is_alive())
        self.assertEqual(self.h.status, 0)
        self.assertTrue(self.model.closed)


class DeclarationTest(unittest.TestCase):
    def test_explicit_functions(self):
        self.assertEqual(Worker(Model(), functions=["echo", "copy"]).functions, ["copy", "echo"])

    def test_bad_declarations_fail_early(self):
        with self.assertRaises(ValueError):
            Worker(Model(), functions=["nope"])
        with self.assertRaises(ValueError):
            Worker(object())
        with self.assertRaises(ValueError):
            Error("TEAPOT", "x")


if __name__ == "__main__":
    unittest.main()
