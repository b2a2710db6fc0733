"""Shared fixtures: tiny datasets in the Hub's parquet layout, the real CIFAR-10 when present, and fake Hubs."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.hub_server import HubServer

# Fixtures that make a test slow: real data, and the tiny dataset that training and CLI runs read.
SLOW_FIXTURES = {"real_cifar10", "tiny_dataset"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks `slow` every test that uses a SLOW_FIXTURES fixture, beside those marked by hand: `pytest -m 'not
    slow'` is the quick loop of a developer (under a minute on 2 cores), the full suite is CI's."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str) -> ModuleType:
    """A script outside the package (benchmarks/, experiments/) imported as module `name`, registered in sys.modules
    (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_parquet_dataset(folder: Path, n_train: int = 64, n_test: int = 32, num_classes: int = 10, seed: int = 0) -> Path:
    """Writes `train-00000-of-00001.parquet` and `test-...` with `img` (PNG) and `label` (ClassLabel) columns."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES[:num_classes])})
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, num_classes, n)
        # Class-dependent colour so tiny models can learn something.
        base = (labels[:, None, None, None] * 25 + rng.integers(0, 40, (n, 32, 32, 3))).clip(0, 255).astype(np.uint8)
        images = [Image.fromarray(img) for img in base]
        data = datasets.Dataset.from_dict({"img": images, "label": labels.tolist()}, features=features)
        data.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("data") / "tiny_cifar")


def real_data_root() -> Path | None:
    """The folder holding `cifar10/` (SGLR_ZOO_DATA, else ../shared/datasets beside the repo), or None."""
    root = Path(os.environ.get("SGLR_ZOO_DATA", REPO.parent / "shared" / "datasets"))
    return root if (root / "cifar10").is_dir() else None


@pytest.fixture(scope="session")
def real_cifar10() -> Path:
    root = real_data_root()
    if root is None:
        if os.environ.get("SGLR_ZOO_REQUIRE_REAL_DATA"):
            pytest.fail("SGLR_ZOO_REQUIRE_REAL_DATA is set but no cifar10/ under SGLR_ZOO_DATA")
        pytest.skip("real CIFAR-10 not found (set SGLR_ZOO_DATA to the folder holding cifar10/)")
    return root / "cifar10"


# ---- fake Hugging Face Hubs: olah (a real Hub mirror, offline) for reads, tests/hub_server.py for writes ----------

@dataclass
class OlahMirror:
    """A running olah that serves the git repositories under `mirrors` as Hub model repos."""

    url: str
    mirrors: Path

    def publish(self, repo_id: str, folder: Path, lfs: tuple[str, ...] = ()) -> Path:
        """Copies `folder` into the mirror as model repo `repo_id`, one git commit on main; the files named in
        `lfs` become LFS pointers (their objects under .git/lfs), as the Hub stores weights."""
        repo = self.mirrors / "models" / repo_id
        shutil.copytree(folder, repo)
        for name in lfs:
            data = (repo / name).read_bytes()
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True)
            obj.write_bytes(data)
            (repo / name).write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
        git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "upload"]):
            subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
        return repo


@pytest.fixture(scope="session")
def olah(tmp_path_factory) -> Iterator[OlahMirror]:
    """olah serving, offline, whatever tests `publish` into its mirror folder (it looks repos up per request)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to build olah's local mirror")
    root = tmp_path_factory.mktemp("olah")
    (root / "mirrors" / "models").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = root / "olah.toml"
    config.write_text(textwrap.dedent(f"""\
        [basic]
        host = "127.0.0.1"
        port = {port}
        repos-path = "{root / 'cache'}"
        mirrors-path = ["{root / 'mirrors'}"]
        hf-scheme = "http"
        hf-netloc = "127.0.0.1:9"
        hf-lfs-netloc = "127.0.0.1:9"
        mirror-scheme = "http"
        mirror-netloc = "127.0.0.1:{port}"
        mirror-lfs-netloc = "127.0.0.1:{port}"

        [accessibility]
        offline = true
        """))
    log = (root / "olah.log").open("w")
    command = [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(root / "logs")]
    server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/api/models/none/none/revision/main", timeout=1)
            except urllib.error.HTTPError:
                break  # it answers (404: no such repo)
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"olah exited: {(root / 'olah.log').read_text()[-2000:]}")
                time.sleep(0.1)
            else:
                break
        else:
            pytest.fail(f"olah did not start: {(root / 'olah.log').read_text()[-2000:]}")
        yield OlahMirror(url, root / "mirrors")
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


@pytest.fixture()
def hub() -> Iterator[HubServer]:
    """The in-memory Hub of tests/hub_server.py: it accepts uploads (create_repo, branches, commits, PRs)."""
    with HubServer() as server:
        yield server


@pytest.fixture()
def hub_client(tmp_path) -> Callable[..., str]:
    """`hub_client(script, endpoint, **env)` runs `script` in a fresh Python whose unmodified huggingface_hub
    client talks to `endpoint` (HF_ENDPOINT must be set before it is imported) with its own empty HF_HOME; it
    returns the script's stdout and fails the test if the script fails."""

    def run(script: str, endpoint: str, **env: str) -> str:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        environment.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
                           HF_HUB_DISABLE_XET="1", PYTHONPATH=str(REPO), **env)
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=environment,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"client failed:\n{done.stdout}\n{done.stderr[-4000:]}"
        return done.stdout

    return run


@pytest.fixture
def fresh_accelerate():
    """One thread (the machine is shared; subprocesses get OMP_NUM_THREADS=1), and a fresh Accelerator state:
    accelerate keeps one per process and refuses a second mixed-precision setting."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny models on a busy 2-core machine: one intra-op thread is many times faster than two fighting for cores.

    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
