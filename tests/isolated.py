"""Risky loads in a child process: native code that crashes takes the child down, not the
test run, and the test names the case that did it.

`run_cases(script, cases)` runs `script` in a fresh interpreter with `CASES` (a list of
JSON values) and `report(i, outcome)` defined; the script reports one outcome per case.
The child announces each case before trying it, so a crash is pinned on its case.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

PRELUDE = '''
import json, sys
CASES = json.load(open(sys.argv[1]))
def begin(i):
    print(json.dumps({"begin": i}), flush=True)
def report(i, outcome, **more):
    print(json.dumps({"i": i, "outcome": outcome, **more}), flush=True)
'''

# One `dlc ...` command line per case, through cli.main: its exit status and stderr, or
# the exception that escaped it (only DlcErrors are caught there, so any other escapes).
CLI = '''
import contextlib, io, traceback
from dlc import cli
for i, argv in enumerate(CASES):
    begin(i)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(argv)
        report(i, "exit", rc=rc, stderr=err.getvalue())
    except BaseException as e:
        report(i, "escaped", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
'''


@dataclass
class ChildRun:
    results: dict          # case index -> its report
    crashed: int | None    # the case that was running when the child died
    returncode: int
    stderr: str


def run_cases(script: str, cases: list, tmp_path, env: dict | None = None, timeout: int = 600) -> ChildRun:
    case_file = tmp_path / f"cases-{os.getpid()}-{id(cases)}.json"
    case_file.write_text(json.dumps(cases))
    code = PRELUDE + textwrap.dedent(script)
    # cwd: `python -c` puts the working directory first on sys.path, and from the repository
    # root that would import the checkout's dlc instead of the installed one the tests use
    r = subprocess.run([sys.executable, "-c", code, str(case_file)], capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})), timeout=timeout, cwd=tmp_path)
    results, begun = {}, None
    for line in r.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and "begin" in msg:
            begun = msg["begin"]
        elif isinstance(msg, dict) and "i" in msg:
            results[msg["i"]] = msg
    crashed = begun if begun is not None and begun not in results else None
    return ChildRun(results, crashed, r.returncode, r.stderr)


def describe_crash(run: ChildRun, labels: list) -> str:
    """A failure message: which case killed the child, and how."""
    how = f"signal {-run.returncode}" if run.returncode < 0 else f"exit status {run.returncode}"
    case = labels[run.crashed] if run.crashed is not None else "no case (between cases)"
    return f"the child process died ({how}) on {case}:\n{run.stderr[-3000:]}"
