"""Targets for `bench.run_isolated` in the tests: module-level so that a spawned process can import
them, and light (no model) so that it starts fast."""

from __future__ import annotations

import os
import signal


def crashes(job, out):
    out.put(("progress", 1))
    os.kill(os.getpid(), signal.SIGSEGV)  # what llama.cpp's AMX path did on a prompt batch


def fails(job, out):
    out.put(("error", "TypeError: generate() got an unexpected keyword argument 'seed'"))


def finishes(job, out):
    for n in range(1, job["total"] + 1):
        out.put(("progress", n))
    out.put(("done", [{"method": job["name"], "length": job["total"], "pid": os.getpid()}], list(range(job["total"])),
             {"prompt_batch": 1}))
