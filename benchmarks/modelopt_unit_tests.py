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
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_pytest(tests: Path, subset: str, junit: Path, alias: bool, extra: list[str]) -> None:
    """One pytest run of ``tests/subset`` writing ``junit``; with ``alias`` on quant-core."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(tests), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", str(tests / subset), "-q", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors", "-W", "ignore", f"--junitxml={junit}", *extra]
    if alias:
        cmd[3:3] = ["-p", "_modelopt_alias"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, env=env, cwd=tests.parent, check=False)


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of the failure message) from a junit file."""
    result: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
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
    args, extra = parser.parse_known_args()
    try:
        import modelopt  # noqa: F401
    except ImportError:
        sys.exit("needs nvidia-modelopt installed (nox -s modelopt -- modelopt_unit_tests.py ...)")
    work = args.work or Path(tempfile.mkdtemp(prefix="modelopt-unit-"))
    work.mkdir(parents=True, exist_ok=True)
    tests = args.tests.resolve()
    runs = {}
    for name, alias in (("modelopt", False), ("quant", True)):
        junit = work / f"{name}.xml"
        if not junit.exists():
            run_pytest(tests, args.subset, junit, alias, extra)
        runs[name] = outcomes(junit)
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
