"""The Gradio demo end to end: `python app.py model.name=tiny` in a subprocess, driven by gradio_client."""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PANDA = str(ROOT / "examples" / "imgs" / "panda_climbing.png")
COFFEE = str(ROOT / "examples" / "imgs" / "coffee_laptop.png")
STREAMING, BATCH = "Streaming", "Batch (scan)"
READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """A running `python app.py model.name=tiny` on a free loopback port; its stderr goes to a log file.
    `upload_dir`: gradio's upload folder (GRADIO_TEMP_DIR), for tests that look into it; else the app's own."""

    def __init__(
        self,
        log_dir: pathlib.Path,
        model: str = "tiny",
        args: tuple[str, ...] = (),
        upload_dir: pathlib.Path | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_dir / f"app-{self.port}.log"
        self.upload_dir = upload_dir
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        env = {k: v for k, v in env.items() if k == "VLM_CACHE" or not k.startswith(("VLM_", "GRADIO_TEMP_DIR"))}
        if upload_dir is not None:
            env["GRADIO_TEMP_DIR"] = str(upload_dir)
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", f"model.name={model}", f"server.port={self.port}", *args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        atexit.register(self.stop)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_status(self, *words: str) -> str:
        """Until the page is served and its /status shows one of `words` (warm-up done or failed); returns it."""
        from gradio_client import Client

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"app.py exited early:\n{self.log()}"
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        client = Client(self.url, verbose=False)
        while time.monotonic() < deadline:
            status = client.predict(api_name="/status")
            if any(w in status for w in words):
                return status
            time.sleep(1)
        raise TimeoutError(f"app.py status not {words} after {READY_TIMEOUT_S} s:\n{self.log()}")

    def wait_ready(self) -> None:
        status = self.wait_status("Ready", "Error")
        if "Ready" not in status:
            raise RuntimeError(f"app.py could not warm up: {status}\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


_shared: list[AppServer | BaseException] = []


def shared_app_server() -> AppServer:
    """One tiny-model server per pytest process, shared by test_app.py and test_browser.py; a failed start is
    remembered, so later tests fail at once instead of waiting for warm-up again."""
    import tempfile

    if not _shared:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="vlm-app-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # runs after the server's own stop (LIFO)
        server = AppServer(folder, upload_dir=folder / "uploads")
        try:
            server.wait_ready()
            _shared.append(server)
        except BaseException as e:
            server.stop()
            _shared.append(e)
            raise
    if isinstance(_shared[0], BaseException):
        raise RuntimeError("app.py failed to start earlier in this run") from _shared[0]
    return _shared[0]


@pytest.fixture(scope="module")
def server() -> AppServer:
    return shared_app_server()


@pytest.fixture()
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def ask(
    client,
    image=PANDA,
    prompt="Describe this image",
    history=(),
    mode=STREAMING,
    temperature=0.0,
    top_p=0.8,
    top_k=20,
    max_new_tokens=24,
    seed=0,
):
    """Submit one /generate call; returns the job (not waited for). A path is uploaded; other values go as they are."""
    from gradio_client import handle_file

    return client.submit(
        handle_file(image) if isinstance(image, (str, os.PathLike)) and image else image,
        prompt,
        list(history),
        mode,
        temperature,
        top_p,
        top_k,
        max_new_tokens,
        seed,
        api_name="/generate",
    )


def answers(job) -> list[str]:
    """Assistant text of every update the job streamed, in order."""
    job.result(timeout=180)
    return [text_of(out[0][-1]) for out in job.outputs()]


def test_streaming_yields_growing_partials(client):
    texts = answers(ask(client, max_new_tokens=40))
    partials = [t for t in texts if t]
    assert len(set(partials)) >= 3, texts  # several distinct partial answers, then the final one
    for a, b in zip(partials, partials[1:], strict=False):
        assert b.startswith(a), (a, b)
    assert partials[-1] == texts[-1]


def test_batch_equals_streaming_for_a_fixed_seed(client):
    for temperature, seed in ((0.0, 0), (0.9, 5)):
        stream = answers(ask(client, mode=STREAMING, temperature=temperature, seed=seed, max_new_tokens=24))[-1]
        job = ask(client, mode=BATCH, temperature=temperature, seed=seed, max_new_tokens=24)
        batch = answers(job)
        assert batch[-1] == stream != ""
        stats = job.outputs()[-1][1]
        assert "batch (lax.scan)" in stats and "tokens/s" in stats and "compiled:" in stats


def test_stats_and_token_shading(client):
    job = ask(client, max_new_tokens=16)
    job.result(timeout=180)
    chat, stats, tokens = job.outputs()[-1]
    assert "first token" in stats and "16 tokens" in stats and "sampler: streaming" in stats
    assert "compiled: " in stats
    scores = [t["class_or_confidence"] for t in tokens]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)
    assert "".join(t["token"] for t in tokens) == text_of(chat[-1])


def test_multi_turn_keeps_the_conversation(client):
    first = ask(client, max_new_tokens=8)
    first.result(timeout=180)
    history = first.outputs()[-1][0]
    job = ask(client, prompt="And what colour is it?", history=history, max_new_tokens=8)
    job.result(timeout=180)
    chat = job.outputs()[-1][0]
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert text_of(chat[0]) == "Describe this image" and text_of(chat[2]) == "And what colour is it?"
    assert text_of(chat[1]) == text_of(history[1])


def test_stop_ends_a_running_generation(client, server):
    job = ask(client, max_new_tokens=2000, temperature=0.7)
    deadline = time.monotonic() + 120
    while len([o for o in job.outputs() if text_of(o[0][-1])]) < 2:  # tokens are flowing
        assert time.monotonic() < deadline and not job.done(), server.log()
        time.sleep(0.1)
    assert job.cancel()
    deadline = time.monotonic() + 30
    while "generation stopped after" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    stopped = int(server.log().rsplit("generation stopped after ", 1)[1].split()[0])
    assert stopped < 2000
    # the model is free again: the next request runs to completion
    assert answers(ask(client, max_new_tokens=8))[-1]


def test_bad_image_is_a_clear_error_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client.exceptions import AppError

    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    with pytest.raises(AppError, match=r"Could not use this image: .*notes\.png.*not a recognised image"):
        ask(client, image=str(fake)).result(timeout=60)
    with pytest.raises(AppError, match="Please type a question"):
        ask(client, prompt="   ").result(timeout=60)
    assert answers(ask(client, image=COFFEE, max_new_tokens=8))[-1]


def test_text_only_question_works(client):
    assert answers(ask(client, image=None, prompt="Say hello", max_new_tokens=8))[-1]


def test_status_endpoint_and_safe_defaults(server, client):
    assert "Ready" in client.predict(api_name="/status")
    assert "tiny" in client.predict(api_name="/status")
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/generate", "/status"}
    assert "127.0.0.1" in server.log() and "share=False" in server.log()


def test_a_model_that_cannot_load_is_reported_on_the_page(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    broken = AppServer(tmp_path, model=str(tmp_path))  # a folder without a checkpoint
    try:
        status = broken.wait_status("Error", "Ready")
        assert "could not load" in status and "config.json" in status
        with pytest.raises(AppError, match="The model could not be loaded"):
            ask(Client(broken.url, verbose=False)).result(timeout=60)
        assert broken.proc.poll() is None  # still serving
    finally:
        broken.stop()


def test_one_generation_at_a_time_others_queue_with_their_position(server):
    from gradio_client import Client
    from gradio_client.utils import Status

    first_client, second_client = Client(server.url, verbose=False), Client(server.url, verbose=False)
    first = ask(first_client, max_new_tokens=2000, temperature=0.7)
    deadline = time.monotonic() + 120
    while not any(text_of(o[0][-1]) for o in first.outputs()):  # the first one is generating
        assert time.monotonic() < deadline and not first.done(), server.log()
        time.sleep(0.1)
    second = ask(second_client, max_new_tokens=8)
    seen = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = second.status()
        seen.add((status.code, status.rank))
        if status.code == Status.IN_QUEUE and status.rank is not None:
            break
        time.sleep(0.05)
    assert any(code == Status.IN_QUEUE and rank is not None for code, rank in seen), seen
    assert not second.done()  # waits while the first generation holds the model
    first.cancel()
    assert answers(second)[-1]  # runs once the first one is stopped
