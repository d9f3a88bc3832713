"""Load, stop and soak against the launched tiny app (marked slow; part of the default run, about 2 minutes).

- 4 clients at once, 3 requests each: all 12 answered, each the same text as the same request made alone, and
  the queue position reported while waiting (one generation runs at a time).
- Stop, and a client that disconnects: the server logs how many decode steps ran after the stop request; at
  most one more token is computed (plus the one step already dispatched), and the next request is answered.
  In Batch (scan) mode Stop ends the scan after the chunk (STOP_CHUNK decode steps) in flight.
- Soak: 50 requests with fresh images of several kinds and sizes, prompts and both samplers: the server's
  resident memory after the last is within 10 % of that after the 5th, nothing compiles after the first 5
  (one of each shape), and no upload is left behind.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from test_app import BATCH, COFFEE, PANDA, ROOT, STREAMING, ask, shared_app_server, text_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    return shared_app_server()


def final(job) -> tuple[list, str]:
    job.result(timeout=300)
    chat, stats, _ = job.outputs()[-1]
    return chat, stats


def test_four_clients_three_requests_each_all_answered_like_alone(server):
    from gradio_client import Client
    from gradio_client.utils import Status

    requests = [
        dict(image=PANDA, prompt="Describe this image", temperature=0.0, seed=1),
        dict(image=COFFEE, prompt="What is on the table?", temperature=0.9, seed=7, mode=BATCH),
        dict(image=None, prompt="Say hello", temperature=0.7, seed=3),
    ]
    alone = Client(server.url, verbose=False)
    expected = [text_of(final(ask(alone, max_new_tokens=12, **r))[0][-1]) for r in requests]

    results: dict[tuple[int, int], str] = {}
    ranks: list[int] = []
    errors: list[BaseException] = []

    def user(u: int) -> None:
        try:
            client = Client(server.url, verbose=False)
            for k in range(3):
                r = (u + k) % 3  # every client sends all three, in its own order
                job = ask(client, max_new_tokens=12, **requests[r])
                while not job.done():
                    status = job.status()
                    if status.code == Status.IN_QUEUE and status.rank is not None:
                        ranks.append(status.rank)
                    time.sleep(0.02)
                results[(u, r)] = text_of(final(job)[0][-1])
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=user, args=(u,)) for u in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(results) == 12  # none lost
    for (u, r), text in results.items():
        assert text == expected[r], (u, r, text, expected[r])
    assert ranks and max(ranks) >= 1, ranks  # queue positions were reported while requests waited


def wait_for_log(server, pattern: str, count: int, timeout: float = 60) -> re.Match:
    """The `count`-th match of `pattern` in the server log (waiting for it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(re.finditer(pattern, server.log()))
        if len(found) >= count:
            return found[count - 1]
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)


STOPPED = r"generation stopped after (\d+) tokens \((.+?)\): decode steps after the stop request: (\d+)"


def test_stop_ends_the_generation_within_a_step_and_frees_the_model(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    for mode_of_stop in range(2):
        seen = len(re.findall(STOPPED, server.log()))
        job = ask(client, max_new_tokens=2000, temperature=0.7, seed=mode_of_stop)
        deadline = time.monotonic() + 120
        while len([o for o in job.outputs() if text_of(o[0][-1])]) < 3:  # tokens are flowing
            assert time.monotonic() < deadline and not job.done(), server.log()[-3000:]
            time.sleep(0.02)
        assert job.cancel()
        tokens, reason, after = wait_for_log(server, STOPPED, seen + 1).groups()
        # gradio's /cancel throws into the running generator (Stop pressed) or just closes it (client gone)
        assert reason in ("Stop pressed", "client gone") and int(after) <= 1 and int(tokens) < 2000
        chat, stats = final(ask(client, max_new_tokens=4))  # the model is free for the next request
        assert "4 tokens" in stats


def test_stop_ends_a_batch_generation_within_a_chunk_and_frees_the_model(server):
    """Batch (scan) decodes in lax.scan chunks of STOP_CHUNK steps and asks between them whether to stop: at
    most the chunk in flight runs after the stop request."""
    from gradio_client import Client

    from vlm.sampling import STOP_CHUNK

    client = Client(server.url, verbose=False)
    for attempt in range(2):  # the first may stop while the long cache's chunk compiles; the second is warm
        seen = len(re.findall(STOPPED, server.log()))
        job = ask(client, mode=BATCH, max_new_tokens=2000, temperature=0.7, seed=attempt)
        deadline = time.monotonic() + 120
        while not any("Generating" in o[1] for o in job.outputs()):  # sample() has started
            assert time.monotonic() < deadline and not job.done(), server.log()[-3000:]
            time.sleep(0.02)
        time.sleep(2)  # decoding, chunk after chunk
        assert not job.done() and job.cancel()
        stopped = time.monotonic()
        tokens, reason, after = wait_for_log(server, STOPPED, seen + 1).groups()
        print(f"batch stop {attempt}: {tokens} tokens, {after} decode steps after the stop request, "
              f"logged {time.monotonic() - stopped:.2f} s after the cancel")
        assert reason in ("Stop pressed", "client gone") and int(after) <= STOP_CHUNK and int(tokens) < 2000
        if attempt:
            assert int(tokens) > 1 + STOP_CHUNK  # the stop came mid-decode, not before the first chunk
        _, stats = final(ask(client, mode=BATCH, max_new_tokens=4))  # the model is free for the next request
        assert "4 tokens" in stats and "stopped" not in stats


def loaded_backend(*argv: str):
    """app.Backend for `app.py model.name=tiny *argv`, loaded in this process without the warm-up."""
    import app
    from vlm import load_model
    from vlm.options import parse

    backend = app.Backend(parse(["model.name=tiny", *argv], ("model", "sampling", "server"), prog="app.py", environ={}))
    backend.model, backend.params, backend.tokenizer = load_model("tiny")
    backend.preprocess = backend.model.preprocess
    backend.ready.set()
    return backend


def test_a_stopped_batch_run_ends_with_its_partial_answer():
    """In process: app.run in Batch (scan) mode, stopped after two chunks, ends with the answer made so far
    and "· stopped" in its stats line, and frees the model lock."""
    import app
    from vlm.sampling import STOP_CHUNK

    backend = loaded_backend()

    class StopAfterTwoChunks(app.Job):
        @property
        def stopped(self) -> bool:  # asked with job.tokens set to the tokens made before each chunk
            if self.tokens > 2 * STOP_CHUNK:
                self.stop("test")
            return super().stopped

    def last(job=None):
        *_, (chat, stats, _tokens, _notes) = app.run(backend, PANDA, "Describe this image", [], BATCH, 0.7, 0.8, 20,
                                                     64, 0, job=job)
        return app.message_text(chat[-1]["content"]), stats

    full, full_stats = last()
    job = StopAfterTwoChunks()
    partial, stats = last(job)
    n = 1 + 2 * STOP_CHUNK
    assert f"{n} tokens" in stats and "· stopped" in stats and job.tokens == n and job.stopped_at == n
    assert "64 tokens" in full_stats and "stopped" not in full_stats
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert not backend.lock.locked()


def test_past_max_programs_the_server_drops_them_and_answers_the_same(capsys):
    """In process: with server.max_programs=3, a request that finds more programs held drops them all first
    (logged), compiles what it needs again and answers as before; under the limit nothing is dropped."""
    import app

    backend = loaded_backend("server.max_programs=3")

    def answer(mode):
        *_, (chat, stats, _tokens, _notes) = app.run(backend, PANDA, "Describe this image", [], mode, 0.7, 0.8, 20,
                                                     12, 0)
        return app.message_text(chat[-1]["content"]), stats

    first = answer(STREAMING)  # vision tower, prefill, decode step: 3 programs, at the limit
    assert backend.model.programs == 3 and "dropping" not in capsys.readouterr().err
    batch = answer(BATCH)  # + the scan chunk: 4
    assert backend.model.programs == 4 and "dropping" not in capsys.readouterr().err
    again = answer(STREAMING)
    assert "dropping 4 compiled programs (server.max_programs=3)" in capsys.readouterr().err
    assert backend.model.programs == 3 and again[0] == first[0] and "compiled: yes" in again[1]
    assert batch[0] == first[0]  # the same seed in both samplers


def test_a_client_that_goes_away_ends_its_generation(server):
    from gradio_client import Client

    seen = len(re.findall(STOPPED, server.log()))
    code = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT / "tests")!r})
from gradio_client import Client
from test_app import ask, text_of
job = ask(Client({server.url!r}, verbose=False), max_new_tokens=2000, temperature=0.7)
while len([o for o in job.outputs() if text_of(o[0][-1])]) < 3:
    time.sleep(0.02)
os._exit(0)  # gone without a word: no cancel, the connection just closes
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=180, check=True)
    tokens, reason, after = wait_for_log(server, STOPPED, seen + 1).groups()
    assert reason == "client gone" and int(after) <= 1 and int(tokens) < 2000
    _, stats = final(ask(Client(server.url, verbose=False), max_new_tokens=4))
    assert "4 tokens" in stats


def soak_image(i: int, kind: int) -> tuple[str, bytes]:
    """A fresh random image for soak request i: several modes, formats and sizes (a few shapes in all)."""
    from PIL import Image

    rng = np.random.default_rng(i)
    size, mode, fmt = [
        ((512, 384), "RGB", "PNG"),
        ((512, 384), "RGBA", "PNG"),
        ((1024, 768), "RGB", "JPEG"),  # downscaled to the tiny model's budget
        ((512, 384), "L", "PNG"),
        ((480, 320), "P", "PNG"),
    ][kind]
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode if mode != "P" else "RGB")
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"soak-{i:02d}.{fmt.lower()}", buf.getvalue()


def test_soak_50_requests_memory_flat_no_recompiles_no_leftover_uploads(server, tmp_path):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    proc = psutil.Process(server.proc.pid)
    prompts = ["Describe picture {i:02d}.", "What colour is image {i:02d}?", "Where was photo {i:02d} taken?"]
    rss, compiled = {}, []
    for i in range(50):
        kind = i % 5  # request k of each kind has the same shapes: the first five compile, the rest reuse them
        name, data = soak_image(i, kind)
        (tmp_path / name).write_bytes(data)
        prompt = prompts[kind % len(prompts)].format(i=i)
        chat, stats = final(
            ask(
                client,
                image=str(tmp_path / name),
                prompt=prompt,
                mode=BATCH if kind % 2 else STREAMING,
                temperature=0.7,
                seed=i,
                max_new_tokens=8,
            )
        )
        assert text_of(chat[-2]) == prompt and "tokens/s" in stats, stats
        compiled.append("compiled: yes" in stats)
        rss[i + 1] = proc.memory_info().rss
    assert not any(compiled[5:]), [i + 1 for i, c in enumerate(compiled) if c]
    # from the second round of each kind: malloc keeps a request's large blocks for the next one (up to
    # 64 MiB free per heap, vlm/memory.py), so the first warm requests fill the heaps once; after that,
    # flat (no per-request growth)
    growth = rss[50] / rss[10] - 1
    assert abs(growth) < 0.10, {k: v // 2**20 for k, v in rss.items()}  # MiB after each request
    assert not [p for p in server.upload_dir.rglob("soak-*")]
