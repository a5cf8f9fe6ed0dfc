"""ModelOpt's own unit tests for ``modelopt.torch.quantization``, run on ModelOpt and then on quant-core.

The second run imports quant-core wherever the tests import ``modelopt.torch.quantization`` (the
``_modelopt_alias`` pytest plugin beside this script; everything else stays ModelOpt's), the way a
migrating user changes one import line. The table counts the tests that pass on ModelOpt and, of
those, the ones that pass on quant-core, per test file; the most frequent first lines of the
failures follow, to show what is still missing.

Needs ModelOpt installed (``nox -s modelopt`` builds that env) and ModelOpt's source tests folder
(of the installed version: ``git clone --depth 1 --branch <tag> https://github.com/NVIDIA/Model-Optimizer``)::

    nox -s modelopt -- modelopt_unit_tests.py --tests <Model-Optimizer>/tests
    python benchmarks/modelopt_unit_tests.py --tests DIR [--subset unit/torch/quantization] [-k EXPR]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_pytest(
    tests: Path,
    paths: list[Path],
    junit: Path,
    alias: bool,
    extra: list[str],
    timeout: float | None = None,
) -> None:
    """One pytest run of ``paths`` (under ``tests``) writing ``junit``; with ``alias`` on quant-core.

    A run that outlives ``timeout`` seconds is killed and leaves no junit (its tests count as not
    passing)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(tests), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", *map(str, paths), "-q", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors", "-W", "ignore", f"--junitxml={junit}", *extra]
    if alias:
        cmd[3:3] = ["-p", "_modelopt_alias"]
    print("$", " ".join(cmd[1:]), flush=True)
    # its own process group, so a timeout also ends the processes a test spawned
    proc = subprocess.Popen(cmd, env=env, cwd=tests.parent, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        junit.unlink(missing_ok=True)
        print(f"!! timed out after {timeout:.0f} s: {' '.join(map(str, paths))}", flush=True)


def outcomes(*junits: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of the failure message) from junit files (missing ones skipped)."""
    result: dict[str, tuple[str, str]] = {}
    cases = [c for j in junits if j.exists() for c in ET.parse(j).getroot().iter("testcase")]
    for case in cases:
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = tag
                message = (node.get("message") or "").strip().splitlines()[:1]
                message = message[0][:150] if message else ""
                break
        result[test_id] = outcome, message
    return result


def module_of(test_id: str) -> str:
    """The test file's module path of a junit test id."""
    classname = test_id.split("::")[0]
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        if parts[i - 1].startswith("test_"):
            return ".".join(parts[:i])
    return classname


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=Path, required=True, help="ModelOpt's tests folder")
    parser.add_argument("--subset", default="unit/torch/quantization")
    parser.add_argument("--work", type=Path, default=None, help="keep the junit files here")
    parser.add_argument("--top", type=int, default=25, help="failure messages listed")
    parser.add_argument(
        "--separate",
        nargs="*",
        default=["plugins", "test_dist.py"],
        help="files or folders of the subset whose quant-core tests run in a pytest process of "
        "their own, so that one that never ends loses only its own tests (default: plugins and "
        "test_dist.py, whose two spawned gloo ranks at times never finish on a busy machine)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds each quant-core pytest run may take"
    )
    parser.add_argument(
        "--rerun-quant",
        action="store_true",
        help="run quant-core again even when --work holds its junit (ModelOpt's is always reused "
        "when present: it does not change)",
    )
    args, extra = parser.parse_known_args()
    try:
        import modelopt  # noqa: F401
    except ImportError:
        sys.exit("needs nvidia-modelopt installed (nox -s modelopt -- modelopt_unit_tests.py ...)")
    work = args.work or Path(tempfile.mkdtemp(prefix="modelopt-unit-"))
    work.mkdir(parents=True, exist_ok=True)
    tests = args.tests.resolve()
    runs = {}
    junit = work / "modelopt.xml"
    if not junit.exists():
        run_pytest(tests, [tests / args.subset], junit, False, extra)
    runs["modelopt"] = outcomes(junit)
    subset = tests / args.subset
    separate = [subset / s for s in args.separate if (subset / s).exists()]
    rest = [
        p
        for p in sorted(subset.iterdir())
        if p not in separate and ((p.is_dir() and p.name != "__pycache__") or p.match("test_*.py"))
    ]
    groups = [("quant", rest)] + [(f"quant_{p.stem}", [p]) for p in separate]
    junits = [work / f"{name}.xml" for name, _ in groups]
    if args.rerun_quant or not all(j.exists() for j in junits):
        for (_name, paths), junit in zip(groups, junits):
            junit.unlink(missing_ok=True)
            run_pytest(tests, paths, junit, True, extra, timeout=args.timeout)
    runs["quant"] = outcomes(*junits)
    reference = {t for t, (o, _) in runs["modelopt"].items() if o == "passed"}
    ours = {t for t in reference if runs["quant"].get(t, ("missing", ""))[0] == "passed"}
    per_file: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for test_id in reference:
        per_file[module_of(test_id)][0] += 1
        per_file[module_of(test_id)][1] += test_id in ours
    print(f"\n{len(runs['modelopt'])} tests run; {len(reference)} pass on ModelOpt; ", end="")
    print(
        f"{len(ours)} of those pass on quant-core ({100 * len(ours) / max(len(reference), 1):.0f}%)"
    )
    print("\n| test file | pass on ModelOpt | pass on quant-core |\n|---|---:|---:|")
    for module, (ref, got) in sorted(per_file.items()):
        print(f"| {module.rsplit('.', 1)[-1]} | {ref} | {got} |")
    messages = collections.Counter(
        runs["quant"].get(t, ("missing", "not collected"))[1]
        or runs["quant"].get(t, ("missing",))[0]
        for t in reference - ours
    )
    print(f"\nmost frequent failures on quant-core (first line), of {len(reference - ours)}:")
    for message, count in messages.most_common(args.top):
        print(f"{count:5d}  {message}")


if __name__ == "__main__":
    main()
