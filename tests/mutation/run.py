"""Mutation check: apply plausible one-line bugs one at a time, run the narrowest tests that should
catch each, restore the file, and report the kill rate and the survivors.

    python -m tests.mutation.run [--only ID ...] [--list] [--check]

(``make mutation`` runs it with the project's venv.) A mutation is *killed* when its tests fail,
*survives* when they pass, and is *invalid* when its text is not found exactly once in its file or
the extension does not build with it (the list is then out of date: fix the list, not the runner).
Mutations of ``csrc/`` rebuild the extension in place before their tests, and the extension is
rebuilt from the restored sources at the end. The files are restored even on Ctrl-C or a kill (SIGTERM). The run refuses
to start when a file it would mutate has uncommitted changes, so nothing of yours is overwritten.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

from .mutations import MUTATIONS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_TIMEOUT_S = 600


def _run(command, timeout=None, env=None):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _rebuild():
    result = _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"])
    return result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _uncommitted(paths):
    result = _run(["git", "status", "--porcelain", "--", *sorted(paths)])
    return result.stdout.strip()


def _imported_elsewhere():
    """The fusedecode packages the tests would import from outside ROOT (an editable install of
    another checkout, say), as 'name: path' lines; empty when everything comes from here."""
    probe = ("import fusedecode, fusedecode.triton_kernels as t; print(fusedecode.__file__); print(t.__file__)")
    result = _run([sys.executable, "-c", probe])
    if result.returncode != 0:
        return "fusedecode does not import: " + result.stderr[-500:]
    outside = [path for path in result.stdout.split() if not os.path.realpath(path).startswith(ROOT + os.sep)
               and not os.path.abspath(path).startswith(ROOT + os.sep)]
    return ", ".join(outside)


def _apply(mutation):
    path = os.path.join(ROOT, mutation.file)
    with open(path) as handle:
        original = handle.read()
    count = original.count(mutation.find)
    if count != 1:
        return None, f"text to mutate found {count} times in {mutation.file}"
    with open(path, "w") as handle:
        handle.write(original.replace(mutation.find, mutation.replace))
    return original, None


def _restore(mutation, original):
    with open(os.path.join(ROOT, mutation.file), "w") as handle:
        handle.write(original)


def _run_tests(mutation):
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests]
    try:
        result = _run(command, timeout=TEST_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return "killed", "timed out"
    # pytest exit codes: 0 all passed, 1 some failed, 5 nothing collected (a broken test selection);
    # negative: killed by a signal.
    if result.returncode == 0:
        return "survived", ""
    if result.returncode == 1:
        return "killed", ""
    if result.returncode < 0:  # the tests crashed (a segfault, an abort): the bug is seen
        return "killed", f"crashed with signal {-result.returncode}"
    return "invalid", f"pytest exit code {result.returncode}: {result.stdout[-1500:]}{result.stderr[-1500:]}"


def run_one(mutation):
    original, problem = _apply(mutation)
    if original is None:
        return "invalid", problem
    try:
        if mutation.native:
            built, log = _rebuild()
            if not built:
                return "invalid", "does not build:\n" + log
        return _run_tests(mutation)
    finally:
        _restore(mutation, original)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these mutation ids")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutation's text occurs exactly once in its file")
    args = parser.parse_args(argv)

    ids = [m.id for m in MUTATIONS]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise SystemExit(f"duplicate mutation ids: {sorted(duplicates)}")
    selected = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.list:
        for m in selected:
            print(f"{m.id:32s} {m.file}: {m.description}")
        return 0
    if args.check:
        stale = [(m.id, open(os.path.join(ROOT, m.file)).read().count(m.find)) for m in selected]
        stale = [(name, count) for name, count in stale if count != 1]
        for name, count in stale:
            print(f"{name}: text found {count} times")
        print(f"{len(selected) - len(stale)} of {len(selected)} mutations apply")
        return 2 if stale else 0
    misplaced = _imported_elsewhere()
    if misplaced:
        raise SystemExit("the tests would import fusedecode from outside this checkout, so no mutation could take "
                         f"effect ({misplaced}); install it (make mutation does) and run again")
    dirty = _uncommitted({m.file for m in selected})
    if dirty:
        raise SystemExit(f"commit or stash these first (the mutation check rewrites them):\n{dirty}")

    # A kill (SIGTERM) unwinds like Ctrl-C, so the mutated file is restored and the extension rebuilt.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    outcomes = {}
    native_touched = False
    start = time.time()
    try:
        for index, mutation in enumerate(selected, 1):
            began = time.time()
            native_touched |= mutation.native
            outcome, detail = run_one(mutation)
            outcomes[mutation.id] = (outcome, detail)
            print(f"[{index:3d}/{len(selected)}] {outcome:8s} {mutation.id} ({time.time() - began:.0f} s)", flush=True)
            if outcome == "invalid":
                print("    " + detail.replace("\n", "\n    ")[:3000], flush=True)
    finally:
        if native_touched:
            built, log = _rebuild()
            print("rebuilt the extension from the restored sources" if built else "REBUILD FAILED:\n" + log)

    killed = [i for i, (o, _) in outcomes.items() if o == "killed"]
    survived = [i for i, (o, _) in outcomes.items() if o == "survived"]
    invalid = [i for i, (o, _) in outcomes.items() if o == "invalid"]
    valid = len(killed) + len(survived)
    rate = 100.0 * len(killed) / valid if valid else 0.0
    print(f"\nkill rate {rate:.1f}% ({len(killed)} killed / {valid} valid mutations; {len(invalid)} invalid) "
          f"in {time.time() - start:.0f} s")
    by_id = {m.id: m for m in MUTATIONS}
    for name in survived:
        print(f"  survived: {name}: {by_id[name].description} ({by_id[name].file})")
    for name in invalid:
        print(f"  invalid:  {name}")
    return 0 if not invalid else 2


if __name__ == "__main__":
    sys.exit(main())
