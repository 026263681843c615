"""Known weights, cache folder, verified downloads, mirrors and model-type detection.

Downloads come from a local HTTP server on 127.0.0.1 that serves a small vit_test
checkpoint; nothing here touches the network or the user's real cache folder.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
from pathlib import Path

import pooch
import pytest
import torch

from napari_sam import checkpoints
from napari_sam.models import weights
from napari_sam.models.registry import model_entry
from napari_sam.build import MODEL_CONFIGS, CheckpointError, build_sam_from_config, detect_model_type, read_state_dict
from napari_sam.checkpoints import (
    CACHE_DIR_ENV,
    MIRROR_ENV,
    DownloadError,
    HashMismatchError,
    KnownWeights,
    build_sam,
    fetch_weights,
    get_cache_dir,
    resolve_checkpoint,
)

FILENAME = "sam_vit_test_0123ab.pth"


class _Server:
    """A bounded file server on 127.0.0.1 that records the paths it was asked for."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        self.truncate = False  # send a full Content-Length, then half the body, then close
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                server.requests.append(self.path)
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self.running = False


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no mirror; the user's cache is never touched."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(cache))
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    return cache


@pytest.fixture(scope="module")
def small_checkpoint(checkpoint_factory) -> tuple[bytes, str]:
    """Bytes of a random vit_test checkpoint and their real xxh128 hash."""
    path = checkpoint_factory("vit_test")
    return path.read_bytes(), "xxh128:" + pooch.file_hash(str(path), alg="xxh128")


@pytest.fixture
def server(small_checkpoint):
    srv = _Server({FILENAME: small_checkpoint[0]})
    yield srv
    srv.stop()


def _register(monkeypatch, url: str, known_hash: str, name: str = "test_small") -> KnownWeights:
    entry = KnownWeights(name, "vit_test", FILENAME, url, known_hash, "random vit_test for tests")
    monkeypatch.setitem(checkpoints.KNOWN_WEIGHTS, name, entry)
    return entry


def _cache_files(cache: Path) -> list[str]:
    return sorted(os.listdir(cache)) if cache.exists() else []


# --- registry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, filename, digest",
    [
        ("vit_h", "sam_vit_h_4b8939.pth", "97698fac30bd929c2e6d8d8cc15933c2"),
        ("vit_l", "sam_vit_l_0b3195.pth", "a82beb3c660661e3dd38d999cc860e9a"),
        ("vit_b", "sam_vit_b_01ec64.pth", "6923c33df3637b6a922d7682bfc9a86b"),
    ],
)
def test_official_weights_are_registered(name, filename, digest):
    entry = checkpoints.known_weights(name)
    assert entry.model_type == name
    assert entry.url == "https://dl.fbaipublicfiles.com/segment_anything/" + filename
    assert entry.filename == filename
    assert entry.known_hash == "xxh128:" + digest


def test_known_weights_lookup_by_default_and_model_type(monkeypatch):
    assert checkpoints.known_weights("default").name == "vit_h"
    _register(monkeypatch, "http://127.0.0.1:9/x", "xxh128:00", name="small_project_model")
    assert checkpoints.known_weights("vit_test").name == "small_project_model"
    with pytest.raises(KeyError, match="vit_b"):
        checkpoints.known_weights("vit_nope")


def test_register_weights_refuses_duplicates_and_bad_hashes(monkeypatch):
    monkeypatch.setattr(weights, "KNOWN_WEIGHTS", dict(weights.KNOWN_WEIGHTS))
    entry = KnownWeights("vit_b", "vit_b", "other.pth", "http://127.0.0.1:9/other.pth", "xxh128:00")
    with pytest.raises(ValueError, match="already registered"):
        checkpoints.register_weights(entry)
    checkpoints.register_weights(entry, replace=True)
    assert weights.KNOWN_WEIGHTS["vit_b"].filename == "other.pth"
    with pytest.raises(ValueError, match="xxh128:<hex digest>"):
        checkpoints.register_weights(KnownWeights("x", "vit_b", "x.pth", "http://h/x.pth", "deadbeef"))


# --- cache folder and mirror ------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "from_env"))
    assert get_cache_dir() == tmp_path / "from_env"
    assert get_cache_dir(tmp_path / "from_arg") == tmp_path / "from_arg"
    monkeypatch.delenv(CACHE_DIR_ENV)
    import platformdirs

    assert get_cache_dir() == platformdirs.user_cache_path("napari-sam", appauthor=False)
    assert "napari-sam" in str(get_cache_dir())


def test_download_url_uses_mirror(monkeypatch):
    entry = checkpoints.known_weights("vit_b")
    assert checkpoints.download_url(entry) == entry.url
    monkeypatch.setenv(MIRROR_ENV, "https://mirror.example.org/sam/")
    assert checkpoints.download_url(entry) == "https://mirror.example.org/sam/sam_vit_b_01ec64.pth"
    assert checkpoints.download_url(entry, mirror="http://intranet/w") == "http://intranet/w/sam_vit_b_01ec64.pth"


# --- downloads --------------------------------------------------------------------------------


def test_download_reports_progress_and_caches(monkeypatch, server, small_checkpoint, isolated_env):
    data, known_hash = small_checkpoint
    _register(monkeypatch, f"{server.base_url}/{FILENAME}", known_hash)
    seen: list[tuple[int, int]] = []
    path = fetch_weights("test_small", progressbar=True, progress_callback=lambda done, total: seen.append((done, total)))

    assert path == isolated_env.resolve() / FILENAME
    assert path.read_bytes() == data
    assert server.requests == [f"/{FILENAME}"]
    assert len(seen) > 2, "expected one callback per 1 MiB chunk of a ~20 MB file"
    counts = [done for done, _ in seen]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), "byte counts must strictly increase"
    assert all(total == len(data) for _, total in seen)
    assert counts[-1] == len(data)
    assert _cache_files(isolated_env) == [FILENAME, FILENAME + ".verified"]


def test_cached_file_is_used_without_request(monkeypatch, server, small_checkpoint, isolated_env):
    _register(monkeypatch, f"{server.base_url}/{FILENAME}", small_checkpoint[1])
    first = fetch_weights("test_small", progressbar=False)
    server.stop()
    calls: list[object] = []
    monkeypatch.setattr(weights, "_verify_local_file", lambda *a: calls.append(a))
    second = fetch_weights("test_small", progressbar=False, progress_callback=lambda *a: calls.append(a))
    assert second == first
    assert server.requests == [f"/{FILENAME}"]
    assert calls == [], "a verified cached file must be neither downloaded nor hashed again"


def test_hand_copied_file_is_verified_once_offline(monkeypatch, small_checkpoint, isolated_env):
    data, known_hash = small_checkpoint
    _register(monkeypatch, f"{_closed_port_url()}/{FILENAME}", known_hash)
    isolated_env.mkdir(parents=True)
    (isolated_env / FILENAME).write_bytes(data)

    path = fetch_weights("test_small", progressbar=False)
    assert path.read_bytes() == data
    assert (isolated_env / (FILENAME + ".verified")).is_file()


def test_changed_cached_file_is_rehashed_and_rejected(monkeypatch, server, small_checkpoint, isolated_env):
    _register(monkeypatch, f"{server.base_url}/{FILENAME}", small_checkpoint[1])
    path = fetch_weights("test_small", progressbar=False)
    with open(path, "r+b") as handle:  # same size, different bytes, new mtime
        handle.seek(1000)
        handle.write(b"\x00" * 16)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(HashMismatchError, match=str(path).replace("\\", "\\\\")):
        fetch_weights("test_small", progressbar=False)
    assert path.is_file(), "a file already in the cache is the user's: reported, not deleted"
    assert server.requests == [f"/{FILENAME}"]


def test_hash_mismatch_deletes_download_and_raises(monkeypatch, server, isolated_env):
    _register(monkeypatch, f"{server.base_url}/{FILENAME}", "xxh128:" + "0" * 32)
    with pytest.raises(HashMismatchError, match="does not match the known hash") as info:
        fetch_weights("test_small", progressbar=False)
    assert f"{server.base_url}/{FILENAME}" in str(info.value)
    assert _cache_files(isolated_env) == []


def test_server_down_error_names_url_file_and_folder(monkeypatch, small_checkpoint, isolated_env):
    url = f"{_closed_port_url()}/{FILENAME}"
    _register(monkeypatch, url, small_checkpoint[1])
    with pytest.raises(DownloadError) as info:
        fetch_weights("test_small", progressbar=False)
    message = str(info.value)
    assert url in message
    assert FILENAME in message
    assert str(isolated_env.resolve()) in message
    assert not isinstance(info.value, HashMismatchError)
    assert _cache_files(isolated_env) == []


def test_interrupted_transfer_leaves_nothing(monkeypatch, server, small_checkpoint, isolated_env):
    _register(monkeypatch, f"{server.base_url}/{FILENAME}", small_checkpoint[1])
    server.truncate = True
    seen: list[int] = []
    with pytest.raises(DownloadError, match=FILENAME):
        fetch_weights("test_small", progressbar=True, progress_callback=lambda done, total: seen.append(done))
    assert server.requests == [f"/{FILENAME}"]
    assert seen and seen[-1] < len(small_checkpoint[0])
    assert _cache_files(isolated_env) == []


def test_progress_callback_can_cancel(monkeypatch, server, small_checkpoint, isolated_env):
    _register(monkeypatch, f"{server.base_url}/{FILENAME}", small_checkpoint[1])

    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        if done > total // 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        fetch_weights("test_small", progressbar=False, progress_callback=cancel)
    assert _cache_files(isolated_env) == []


def test_mirror_env_fetches_same_file_name(monkeypatch, server, small_checkpoint, tmp_path):
    data, known_hash = small_checkpoint
    _register(monkeypatch, f"{_closed_port_url()}/{FILENAME}", known_hash)  # official URL is unreachable
    monkeypatch.setenv(MIRROR_ENV, server.base_url + "/")
    path = fetch_weights("test_small", cache_dir=tmp_path / "arg_cache", progressbar=False)
    assert path == (tmp_path / "arg_cache").resolve() / FILENAME
    assert path.read_bytes() == data
    assert server.requests == [f"/{FILENAME}"]


def test_mirror_without_the_file_names_the_mirror_url(monkeypatch, server, small_checkpoint):
    server.files = {}
    _register(monkeypatch, "https://dl.example.org/official/" + FILENAME, small_checkpoint[1])
    monkeypatch.setenv(MIRROR_ENV, server.base_url)
    with pytest.raises(DownloadError, match="404") as info:
        fetch_weights("test_small", progressbar=False)
    assert f"{server.base_url}/{FILENAME}" in str(info.value)


# --- checkpoints and model types --------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(MODEL_CONFIGS))
def test_detect_model_type_for_every_registry_type(model_type):
    with torch.device("meta"):  # shapes only: vit_h is never materialised
        state = build_sam_from_config(MODEL_CONFIGS[model_type]).state_dict()
    # Other weights of an architecture (micro-sam's vit_b_lm, ...) are detected as the architecture's type.
    assert detect_model_type(state) == model_entry(model_type).base_type


def test_detect_model_type_rejects_non_sam_and_unknown_encoders():
    with pytest.raises(CheckpointError, match="pos_embed"):
        detect_model_type({"weight": torch.zeros(3)})
    with torch.device("meta"):
        state = build_sam_from_config(MODEL_CONFIGS["vit_test"]).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("image_encoder.blocks.1.")}
    with pytest.raises(CheckpointError, match="1 blocks"):
        detect_model_type(state)


@pytest.mark.parametrize("layout", ["bare", "model", "state_dict", "module_prefix"])
def test_build_sam_loads_checkpoint_layouts(layout, checkpoint_factory, tmp_path):
    state = read_state_dict(checkpoint_factory("vit_test"))
    if layout == "module_prefix":
        payload: object = {"module." + k: v for k, v in state.items()}
    elif layout == "bare":
        payload = state
    else:
        payload = {layout: state, "epoch": 3}
    path = tmp_path / f"{layout}.pth"
    torch.save(payload, path)

    model = build_sam(checkpoint=path, device="cpu")
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not model.training


@pytest.mark.parametrize(
    "content, match",
    [
        (b"this is not a checkpoint" * 100, "Could not read"),
        ({"optimizer": {"lr": 0.1}}, "does not hold a state dict"),
        ([torch.zeros(2)], "does not hold a state dict"),
        ({"weight": torch.zeros(2)}, "Not a Segment Anything state dict"),
    ],
)
def test_build_sam_rejects_other_files(content, match, tmp_path):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match):
        build_sam(checkpoint=path, device="cpu")


def test_build_sam_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_sam(checkpoint=tmp_path / "missing.pth")


def test_build_sam_refuses_a_checkpoint_of_another_type(checkpoint_factory):
    path = checkpoint_factory("vit_test")
    with pytest.raises(CheckpointError, match="holds a vit_test SAM checkpoint, not vit_small"):
        build_sam("vit_small", checkpoint=path, device="cpu")
    with pytest.raises(CheckpointError, match="not default as requested"):
        build_sam("default", checkpoint=path, device="cpu")  # an alias of vit_h
    # the same type by name, "auto" and None build what the file holds
    for model_type in ("vit_test", "auto", None):
        model = build_sam(model_type, checkpoint=path, device="cpu")
        assert model.image_encoder.pos_embed.shape[-1] == MODEL_CONFIGS["vit_test"].embed_dim


def test_build_sam_accepts_reference_style_positional_path(checkpoint_factory):
    model = build_sam(str(checkpoint_factory("vit_test")), device="cpu")
    assert len(model.image_encoder.blocks) == MODEL_CONFIGS["vit_test"].depth


def test_build_sam_downloads_known_weights(monkeypatch, server, small_checkpoint, isolated_env):
    _register(monkeypatch, f"{server.base_url}/{FILENAME}", small_checkpoint[1])
    seen: list[int] = []
    model = build_sam("vit_test", device="cpu", progressbar=False, progress_callback=lambda d, t: seen.append(d))
    expected = read_state_dict(isolated_env / FILENAME)
    assert torch.equal(model.image_encoder.pos_embed, expected["image_encoder.pos_embed"])
    assert seen[-1] == len(small_checkpoint[0])
    build_sam("vit_test", device="cpu", progressbar=False)
    assert len(server.requests) == 1


def test_build_sam_without_known_weights_explains(monkeypatch):
    monkeypatch.setattr(weights, "KNOWN_WEIGHTS", {})
    with pytest.raises(KeyError, match="sam_model_registry"):
        build_sam("vit_b")


def test_default_device_follows_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checkpoints.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert checkpoints.default_device() == torch.device("cuda")


def test_resolve_checkpoint_prefers_given_path(checkpoint_factory, tmp_path):
    path = checkpoint_factory("vit_test")
    assert resolve_checkpoint("vit_h", path) == path
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_checkpoint("vit_h", tmp_path / "nope.pth")


def test_sam_model_registry_rejects_wrong_type_before_building(checkpoint_factory, monkeypatch):
    from napari_sam import build

    def fail(*args, **kwargs):
        raise AssertionError("the model must not be built for a checkpoint of another type")

    monkeypatch.setattr(build, "build_sam_from_config", fail)
    with pytest.raises(CheckpointError, match="vit_test model, not vit_h"):
        build.sam_model_registry["default"](checkpoint=checkpoint_factory("vit_test"))


def test_public_names_are_exported_lazily():
    import napari_sam

    assert napari_sam.build_sam is build_sam
    assert napari_sam.resolve_checkpoint is resolve_checkpoint
    assert napari_sam.KNOWN_WEIGHTS is checkpoints.KNOWN_WEIGHTS
