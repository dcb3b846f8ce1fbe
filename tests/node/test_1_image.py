"""The image `tests/tools/build image` writes keeps the Dockerfile's runtime contract (path, user,
entrypoint, ports) and runs from its own root file system: what the chart's pods run is what a
`docker build` of the Dockerfile would give, without a Docker engine."""

import gzip
import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

from support import ROOT

ARCHIVE = Path(os.environ.get("BACKSTOP_IMAGE_ARCHIVE", ROOT / "target" / "test-tools" / "images" / "backstop.tar"))


def runtime_stage():
    """The Dockerfile's last stage, instruction by instruction."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    stage = {}
    for line in lines[last:]:
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        stage.setdefault(instruction, []).append(rest.strip())
    return stage


def image():
    with tarfile.open(ARCHIVE) as archive:
        blob = lambda digest: archive.extractfile("blobs/sha256/" + digest.split(":", 1)[1]).read()
        index = json.loads(archive.extractfile("index.json").read())
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        layers = [gzip.decompress(blob(layer["digest"])) for layer in manifest["layers"]]
        name = index["manifests"][0]["annotations"]["io.containerd.image.name"]
    return name, config, layers


def test_the_image_keeps_the_dockerfile_runtime_contract():
    stage = runtime_stage()
    name, config, layers = image()
    chart = (ROOT / "charts" / "backstop" / "Chart.yaml").read_text()
    app_version = re.search(r'^appVersion: "?([^"\n]+)"?', chart, re.M).group(1)
    assert name == f"ghcr.io/backstop/backstop:{app_version}", "the chart's own image reference"
    image_config = config["config"]
    assert image_config["User"] == stage["USER"][0]
    assert image_config["Entrypoint"] == json.loads(stage["ENTRYPOINT"][0])
    assert image_config["Cmd"] == json.loads(stage["CMD"][0])
    exposed = {f"{port}/tcp" for port in stage["EXPOSE"][0].split()}
    assert set(image_config["ExposedPorts"]) == exposed
    (copy,) = [c for c in stage["COPY"] if "backstop" in c]
    binary = copy.split()[-1]
    names = {}
    for layer in layers:
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            names.update({"/" + member.name: member for member in tar.getmembers()})
    assert names[binary].isfile() and names[binary].mode & 0o111, binary
    for needed in ("/etc/ssl/certs/ca-certificates.crt", "/etc/passwd", "/lib64/ld-linux-x86-64.so.2",
                   "/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libgcc_s.so.1"):
        assert needed in names, f"{needed} is missing from the image"
    assert not any(path.startswith(("/bin/sh", "/usr/bin/")) for path in names), "no shell, no tools"


def test_the_binary_runs_from_the_image_alone(tmp_path):
    _, _, layers = image()
    root = tmp_path / "rootfs"
    root.mkdir()
    for layer in layers:
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            tar.extractall(root, filter="tar")
    passwd = (root / "etc" / "passwd").read_text()
    assert "nonroot:x:65532:65532:" in passwd
    bundle = (root / "etc" / "ssl" / "certs" / "ca-certificates.crt").read_text()
    assert bundle.count("BEGIN CERTIFICATE") > 100, "Debian's CA bundle"
    # Every library the binary links comes from the image itself: it runs chrooted into it, as
    # the image's own user.
    result = subprocess.run(["chroot", "--userspec=65532:65532", str(root), "/usr/local/bin/backstop", "--version"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("backstop "), result.stdout
