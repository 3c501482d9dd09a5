"""Serving on Triton Inference Server: `serve` (PyTriton) under load and faults, and `triton-repo`
in the Triton server binary the nvidia-pytriton wheel ships. Everything talks to 127.0.0.1 only,
every loop is bounded in count and time, and every server is stopped by a finalizer.

Answers are checked against the direct pipeline (`greedy_generate`, batch 1, a full prefill) on
images decoded from files, while the server decodes the same images from request bytes and
answers on reused prefixes in dynamic batches.
"""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="serving needs tritonclient (requirements.txt)")
pytriton = pytest.importorskip("pytriton", reason="serving needs nvidia-pytriton (requirements.txt)")

from click.testing import CliRunner  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from visiondrop_edge import cli  # noqa: E402

from visiondrop_edge.prompt import build_prompts, load_images, pixel_values, random_images  # noqa: E402
from visiondrop_edge.runtime.generate import greedy_generate  # noqa: E402
from visiondrop_edge.runtime.serve import python_backend_environment  # noqa: E402
from visiondrop_edge.runtime.session import Session  # noqa: E402
from visiondrop_edge.runtime.torch_backend import TorchBackend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET = "64"
NEW_TOKENS = 8
QUESTIONS = ["What is in this image?", "Which colour dominates?", "Describe the scene.", "How many objects are there?"]
CLIENTS, PER_CLIENT = 8, 8  # 64 requests over 4 images x 4 questions
CACHED_PREFIXES = 5  # the server's --prefix-cache-bytes holds this many prefixes
# Served and direct answers compute the same sums in another blocking (a reused prefix, other
# batch rows, left padding), so their logits agree to fp32 rounding, not bit for bit; the
# reuse tests bound that at 1e-4 of the logits' scale. A greedy token can then only differ
# where the reference's top-2 gap is within twice that bound (the tie rule): tokens are
# compared up to the first such step (measured here: the smallest gap is above it).
LOGIT_RELATIVE = 1e-4
STARTUP_S, REQUEST_S = 180, 120
KEPT = [96, 70, 52, 38]  # budget 64 on 8 layers: 84+12 into the LLM, then 60+10, 44+8, 32+6
# A client process that opens a stream, prints a line per response as it arrives, and waits to be killed.
STREAM_CLIENT = """
import sys, time
import numpy as np
import tritonclient.grpc as grpc
url, image, prompt, new_tokens = sys.argv[1], open(sys.argv[2], "rb").read(), sys.argv[3].encode(), int(sys.argv[4])
inputs = [grpc.InferInput("image", [1, 1], "BYTES"), grpc.InferInput("prompt", [1, 1], "BYTES"),
          grpc.InferInput("max_new_tokens", [1, 1], "INT32")]
for tensor, value in zip(inputs, ([[image]], [[prompt]])):
    tensor.set_data_from_numpy(np.array(value, dtype=np.object_))
inputs[2].set_data_from_numpy(np.array([[new_tokens]], dtype=np.int32))
client = grpc.InferenceServerClient(url)
client.start_stream(callback=lambda result, error: print("error" if error else "response", flush=True))
client.async_stream_infer("visiondrop_stream", inputs, enable_empty_final_response=True)
time.sleep(600)
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def request_inputs(image: bytes | None, prompt: bytes | None, max_new_tokens: int | None = NEW_TOKENS):
    inputs = []
    for name, value in (("image", image), ("prompt", prompt)):
        if value is not None:
            tensor = tritonclient_grpc.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
            inputs.append(tensor)
    if max_new_tokens is not None:
        tensor = tritonclient_grpc.InferInput("max_new_tokens", [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[max_new_tokens]], dtype=np.int32))
        inputs.append(tensor)
    return inputs


def wait_ready(process, url: str, model: str, log: Path) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    try:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if client.is_model_ready(model):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        pytest.fail(f"the server was not ready within {STARTUP_S} s:\n{log.read_text()[-4000:]}")
    finally:
        client.close()


def stop(process, timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode


def comparable(tokens: list[int], step_logits: list[torch.Tensor]) -> int:
    """How many reference tokens no fp32-rounding difference can flip (the tie rule)."""
    for step, logits in enumerate(step_logits):
        top = logits[0].topk(2).values
        if top[0] - top[1] <= 2 * LOGIT_RELATIVE * logits[0].abs().max():
            return step + 1  # this token may be a tie; nothing after it is comparable
    return len(tokens)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four images as PNG files (the reference reads these) and as request bytes."""
    folder = tmp_path_factory.mktemp("images")
    pictures = random_images(7, seed=31)
    paths = []
    for number, picture in enumerate(pictures):
        path = folder / f"image{number}.png"
        picture.save(path)
        paths.append(path)
    return {"paths": paths, "bytes": [path.read_bytes() for path in paths]}


@pytest.fixture(scope="module")
def reference(tiny, images):
    """The direct answer for every (image, question) of the load test: a full prefill, batch 1."""
    backend = TorchBackend(tiny, tiny.schedule(BUDGET))
    spec = backend.spec
    answers = {}
    for number, path in enumerate(images["paths"][:4]):
        pixels = pixel_values(tiny.processor.image_processor, load_images([path]), spec.prompt_template)
        for question in QUESTIONS:
            batch = build_prompts(tiny.tokenizer, spec.prompt_template, [question], spec.schedule.image_tokens,
                                  spec.image_token_id, spec.pad_token_id)
            result = greedy_generate(backend, pixels, batch, NEW_TOKENS)
            tokens = result.tokens[0].tolist()
            answers[number, question] = (tokens, comparable(tokens, result.step_logits))
    [prefix] = Session(backend, tiny.processor, "tiny").encode_prefix(pixels)
    return {"answers": answers, "prefix_bytes": prefix.nbytes}


def start_serve(folder: Path, ports: list[int], cache_bytes: int):
    """`python cli.py serve` on the tiny model; its output goes to folder/serve.log, Triton's to folder/triton.log."""
    http_port, grpc_port, metrics_port = ports
    command = [sys.executable, "cli.py", "serve", "--model", "tiny", "--budget", BUDGET, "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--max-batch", "8",
               "--batch-delay-us", "5000", "--max-new-tokens", str(NEW_TOKENS),
               "--prefix-cache-bytes", str(cache_bytes), "--log-file", str(folder / "triton.log")]
    with (folder / "serve.log").open("w") as output:
        return subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def assert_ports_free(ports) -> None:
    for port in ports:  # Triton and its backends are gone: every port is free again
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))


@pytest.fixture(scope="module")
def server(reference, tmp_path_factory):
    """`python cli.py serve` on the tiny model, on free loopback ports."""
    folder = tmp_path_factory.mktemp("serve")
    http_port, grpc_port, metrics_port = ports = free_ports(3)
    log = folder / "serve.log"
    process = start_serve(folder, ports, CACHED_PREFIXES * reference["prefix_bytes"])
    try:
        wait_ready(process, f"127.0.0.1:{http_port}", "visiondrop", log)
        yield {"process": process, "grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}",
               "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "ports": (http_port, grpc_port, metrics_port), "log": log}
    finally:
        stop(process)


def stats(server) -> dict:
    client = tritonclient_grpc.InferenceServerClient(server["grpc"])
    try:
        query = tritonclient_grpc.InferInput("query", [1, 1], "BYTES")
        query.set_data_from_numpy(np.array([[b""]], dtype=np.object_))
        return json.loads(client.infer("visiondrop_stats", [query], client_timeout=REQUEST_S).as_numpy("stats")[0, 0])
    finally:
        client.close()


def ask(client, image: bytes, question: str, request_id: str = "", max_new_tokens: int | None = NEW_TOKENS):
    result = client.infer("visiondrop", request_inputs(image, question.encode(), max_new_tokens), request_id=request_id,
                          client_timeout=REQUEST_S)
    return {"id": result.get_response().id, "tokens": result.as_numpy("tokens")[0].tolist(),
            "kept": result.as_numpy("kept_tokens")[0].tolist(), "hit": bool(result.as_numpy("prefix_cache_hit")[0, 0]),
            "text": result.as_numpy("text")[0, 0]}


def stream(server, requests: list[tuple[str, list]]) -> tuple[dict[str, list[dict]], list[str]]:
    """Send (request id, inputs) pairs on one gRPC stream to visiondrop_stream; each request's
    responses in arrival order, until its final one, and the error messages (they carry no id)."""
    arrived = queue.Queue()
    client = tritonclient_grpc.InferenceServerClient(server["grpc"])
    responses, errors = {number: [] for number, _ in requests}, []
    try:
        client.start_stream(callback=lambda result, error: arrived.put((result, error)))
        for number, inputs in requests:
            client.async_stream_infer("visiondrop_stream", inputs, request_id=number, enable_empty_final_response=True)
        deadline, remaining = time.monotonic() + REQUEST_S, len(requests)
        while remaining:
            result, error = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            if error is not None:  # an error response is a request's last
                errors.append(error.message())
                remaining -= 1
                continue
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                remaining -= 1
            if response.outputs:
                responses[response.id].append({
                    "tokens": result.as_numpy("tokens")[0].tolist(), "text": result.as_numpy("text")[0, 0].decode(),
                    "kept": result.as_numpy("kept_tokens")[0].tolist(), "hit": bool(result.as_numpy("prefix_cache_hit")[0, 0])})
    finally:
        client.stop_stream()
        client.close()
    return responses, errors


def assert_answers(reply, expected) -> None:
    tokens, length = expected
    assert reply["tokens"][:length] == tokens[:length]
    assert len(reply["tokens"]) == len(tokens)  # no EOS on this model within NEW_TOKENS: the full answer


def test_load_every_answer_is_the_direct_one_nothing_lost_or_duplicated(server, images, reference, tiny):
    answers = reference["answers"]
    assert len({tuple(tokens) for tokens, _ in answers.values()}) == len(answers)  # a swapped reply would show
    assert min(length for _, length in answers.values()) == NEW_TOKENS  # no near-tie: every token is compared
    before = stats(server)
    jobs = [(i, (i // 4) % 4, QUESTIONS[i % 4]) for i in range(CLIENTS * PER_CLIENT)]  # (id, image, question)
    replies, latencies, errors = {}, [], []
    lock = threading.Lock()

    def client_loop(mine):
        client = tritonclient_grpc.InferenceServerClient(server["grpc"])
        try:
            for number, image, question in mine:
                started = time.perf_counter()
                reply = ask(client, images["bytes"][image], question, request_id=str(number))
                with lock:
                    latencies.append(time.perf_counter() - started)
                    replies.setdefault(number, []).append((image, question, reply))
        except Exception as exc:  # reported below; the other clients go on
            with lock:
                errors.append(repr(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(jobs[c::CLIENTS],)) for c in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_S * PER_CLIENT)
    concurrent_s = time.perf_counter() - started
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert sorted(replies) == [number for number, _, _ in jobs]  # every request answered, each exactly once
    for number, [(image, question, reply)] in replies.items():
        assert reply["id"] == str(number)
        assert_answers(reply, answers[image, question])
        assert reply["kept"] == KEPT
    after = stats(server)
    served = after["server"]["requests"] - before["server"]["requests"]
    hits = sum(reply["hit"] for [(_, _, reply)] in replies.values())
    misses = after["prefix_cache"]["misses"] - before["prefix_cache"]["misses"]
    assert served == len(jobs) and after["server"]["refused"] == before["server"]["refused"]
    # Each image is encoded once: by the first batch that meets it, for all of that batch's rows of it
    # (they report no cache hit); every later request finds it in the cache.
    assert misses == 4 and 4 <= len(jobs) - hits <= 4 * 8
    batches = after["server"]["batches"] - before["server"]["batches"]
    assert after["server"]["largest_batch"] > 1 and batches < len(jobs)  # Triton's dynamic batcher grouped requests

    client = tritonclient_grpc.InferenceServerClient(server["grpc"])
    sequential = []
    try:
        for number in range(CLIENTS):
            image, question = number % 4, QUESTIONS[(number + 1) % 4]
            started_one = time.perf_counter()
            reply = ask(client, images["bytes"][image], question)
            sequential.append(time.perf_counter() - started_one)
            assert_answers(reply, answers[image, question])
    finally:
        client.close()
    figures = {
        "concurrent": {"requests": len(jobs), "clients": CLIENTS, "requests_per_s": len(jobs) / concurrent_s,
                       "p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p95_ms": 1e3 * float(np.percentile(latencies, 95)),
                       "batches": batches, "mean_batch": len(jobs) / batches},
        "sequential": {"requests": len(sequential), "requests_per_s": len(sequential) / sum(sequential),
                       "p50_ms": 1e3 * float(np.percentile(sequential, 50)),
                       "p95_ms": 1e3 * float(np.percentile(sequential, 95))},
        "prefix_cache_hit_rate": hits / len(jobs), "images_encoded": misses,
        "answered_on_a_shared_prefix": 1 - misses / len(jobs),
    }
    print(f"\nserve load (tiny, budget {BUDGET}, {NEW_TOKENS} new tokens): {json.dumps(figures)}")
    report = os.environ.get("VISIONDROP_SERVE_REPORT")
    if report:
        Path(report).write_text(json.dumps(figures, indent=2) + "\n")

    with urllib.request.urlopen(server["metrics"], timeout=30) as response:  # Triton's own metrics
        metrics = response.read().decode()
    success = [line for line in metrics.splitlines() if line.startswith('nv_inference_request_success{model="visiondrop",')]
    assert success and float(success[0].split()[-1]) >= len(jobs)  # Triton updates it between requests, not at once


MALFORMED = ["missing image", "undecodable bytes", "empty prompt", "oversize prompt"]


def malformed(good: bytes, case: str) -> tuple[tuple, str]:
    """A malformed request's (image, prompt) and the fragment its error must carry."""
    bad = {"missing image": (None, b"What is this?"), "undecodable bytes": (b"\x89PNG not really", b"What is this?"),
           "empty prompt": (good, b"   "), "oversize prompt": (good, b"x" * 5000)}[case]
    expected = {"missing image": "the request has no 'image' input", "undecodable bytes": "cannot be decoded",
                "empty prompt": "the prompt is empty", "oversize prompt": "shorten the prompt"}[case]
    return bad, expected


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_request_fails_alone_and_the_server_keeps_serving(server, images, reference, case):
    good = images["bytes"][1]
    bad, expected = malformed(good, case)
    before = stats(server)
    outcome = {}

    def send(name, inputs):
        client = tritonclient_grpc.InferenceServerClient(server["grpc"])
        try:
            outcome[name] = client.infer("visiondrop", inputs, client_timeout=REQUEST_S).as_numpy("tokens")[0].tolist()
        except InferenceServerException as exc:
            outcome[name] = exc
        finally:
            client.close()

    # The bad request among good ones sent at the same time: only it fails, even if batched with them.
    senders = [threading.Thread(target=send, args=("bad", request_inputs(*bad)))]
    senders += [threading.Thread(target=send, args=(q, request_inputs(good, q.encode()))) for q in QUESTIONS[:3]]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(REQUEST_S)
    assert isinstance(outcome["bad"], InferenceServerException) and expected in outcome["bad"].message()
    for question in QUESTIONS[:3]:
        tokens, length = reference["answers"][1, question]
        assert outcome[question][:length] == tokens[:length]
    assert stats(server)["server"]["refused"] - before["server"]["refused"] == 1


def test_streamed_tokens_are_the_answer_token_by_token(server, images, reference, tiny):
    # Three streams at once on one connection, two of them on one image: their steps interleave on one prefix.
    pairs = [(0, QUESTIONS[0]), (0, QUESTIONS[3]), (3, QUESTIONS[1])]
    before = stats(server)
    responses, errors = stream(server, [(f"s{n}", request_inputs(images["bytes"][i], q.encode())) for n, (i, q) in enumerate(pairs)])
    assert not errors
    client = tritonclient_grpc.InferenceServerClient(server["grpc"])
    try:
        for number, (image, question) in enumerate(pairs):
            streamed = responses[f"s{number}"]
            assert all(len(r["tokens"]) == 1 and r["kept"] == KEPT for r in streamed)  # one response per token
            tokens = [r["tokens"][0] for r in streamed]
            assert_answers({"tokens": tokens}, reference["answers"][image, question])  # the direct generate answer
            whole = ask(client, images["bytes"][image], question)  # the same request, not streamed
            assert tokens == whole["tokens"]
            pieces = [r["text"] for r in streamed]
            text = tiny.tokenizer.decode(tokens, skip_special_tokens=True)
            assert "".join(pieces) == whole["text"].decode() == text and sum(map(bool, pieces)) > 1  # text as it comes
    finally:
        client.close()
    after = stats(server)["server"]
    assert after["streams"] - before["server"]["streams"] == len(pairs) and after["streaming"] == 0


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_stream_request_fails_alone(server, images, reference, case):
    good = images["bytes"][1]
    bad, expected = malformed(good, case)
    before = stats(server)
    # On one stream: a good request, the bad one, another good one; only the bad one fails.
    responses, errors = stream(server, [("good", request_inputs(good, QUESTIONS[2].encode())), ("bad", request_inputs(*bad)),
                                        ("after", request_inputs(good, QUESTIONS[0].encode()))])
    assert len(errors) == 1 and expected in errors[0] and responses["bad"] == []
    for number, question in (("good", QUESTIONS[2]), ("after", QUESTIONS[0])):
        assert_answers({"tokens": [r["tokens"][0] for r in responses[number]]}, reference["answers"][1, question])
    after = stats(server)["server"]
    assert after["refused"] - before["server"]["refused"] == 1 and after["streams"] - before["server"]["streams"] == 2


def test_a_client_that_disconnects_mid_stream_leaks_no_cache_entry(server, images, reference):
    """A client process killed after its first tokens (the connection drops, no goodbye)."""
    before = stats(server)
    new_tokens, received = 200, 3
    client = subprocess.Popen([sys.executable, "-c", STREAM_CLIENT, server["grpc"], str(images["paths"][4]), "Describe the scene.",
                               str(new_tokens)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in client.stdout], daemon=True).start()
    try:
        seen = [lines.get(timeout=REQUEST_S) for _ in range(received)]
    finally:
        client.kill()
        client.wait(30)
    assert seen == ["response"] * received  # killed mid-stream: 3 of 200 tokens in, no final response yet
    # The server was still generating when its client went (197 tiny-model steps take seconds here,
    # this query milliseconds). PyTriton 0.7 tells a model nothing of a cancelled request, so the
    # stream runs to its end (bounded by --max-new-tokens-limit), then drops its caches.
    assert stats(server)["server"]["streaming"] == 1
    deadline = time.monotonic() + REQUEST_S
    while (after := stats(server))["server"]["streaming"] and time.monotonic() < deadline:
        time.sleep(0.2)
    cache = after["prefix_cache"]
    assert after["server"]["streaming"] == 0 and after["server"]["in_flight"] == 0  # the stream's caches are gone
    # The cache holds whole prefixes only (nothing of the stream's answer), within its budget: its image is an
    # ordinary entry, and the server goes on answering.
    assert cache["bytes"] == cache["entries"] * reference["prefix_bytes"] <= cache["budget_bytes"]
    assert cache["entries"] == min(before["prefix_cache"]["entries"] + 1, CACHED_PREFIXES)
    other = tritonclient_grpc.InferenceServerClient(server["grpc"])
    try:
        assert_answers(ask(other, images["bytes"][0], QUESTIONS[0]), reference["answers"][0, QUESTIONS[0]])
        for number in (5, 6):  # two more new images: the least recently used entries go, within the budget
            ask(other, images["bytes"][number], QUESTIONS[0])
        full = stats(server)["prefix_cache"]
        assert full["entries"] <= CACHED_PREFIXES and full["bytes"] == full["entries"] * reference["prefix_bytes"]
        assert full["bytes"] <= full["budget_bytes"] and full["evictions"] > cache["evictions"]
    finally:
        other.close()


def test_sigterm_stops_the_server_cleanly(server):
    process = server["process"]
    assert stop(process) == 0
    output = server["log"].read_text()
    assert "stopped:" in output and "Traceback" not in output
    assert_ports_free(server["ports"])


def test_sigterm_while_starting_stops_cleanly(tmp_path):
    """A supervisor may stop a server that is still loading its models."""
    ports = free_ports(3)
    process = start_serve(tmp_path, ports, 1 << 20)
    triton_log = tmp_path / "triton.log"
    try:
        deadline = time.monotonic() + STARTUP_S  # Triton writes its log once it runs, loading the models
        while not (triton_log.exists() and triton_log.stat().st_size) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None and triton_log.stat().st_size
    finally:
        code = stop(process)
    output = (tmp_path / "serve.log").read_text()
    assert code == 0 and "serving 'visiondrop'" not in output  # stopped before it served
    assert "stopped: 0 answered" in output and "Traceback" not in output
    assert_ports_free(ports)


def test_serve_refuses_a_port_in_use_before_loading():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(cli.cli, ["serve", "--http-port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "choose another --http-port" in result.output and "loading" not in result.output


# ------------------------------------------------------------------ triton-repo


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts

    folder = tmp_path_factory.mktemp("repo") / "tiny-32"
    export_artifacts(tiny, tiny.schedule("32"), folder, ExportOptions())
    return folder


def bundled_tritonserver(folder: Path) -> tuple[Path, Path, dict[str, str]]:
    """The wheel's tritonserver, a backend folder with its Python backend and this Python's stub, and the environment."""
    package = Path(pytriton.__file__).resolve().parent
    dist = package / "tritonserver"
    backend = folder / "backends" / "python"
    backend.mkdir(parents=True)
    for item in (dist / "backends" / "python").iterdir():
        if item.is_file():
            (backend / item.name).symlink_to(item)
    stub = dist / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    (backend / "triton_python_backend_stub").symlink_to(stub)
    environment = python_backend_environment(dict(os.environ))
    environment["LD_LIBRARY_PATH"] += ":" + str(package.parent / "nvidia_pytriton.libs")
    environment["PATH"] = f"{Path(sys.executable).parent}:{environment['PATH']}"  # the stub runs this Python's packages
    return dist / "bin" / "tritonserver", folder / "backends", environment


def test_triton_repo_loads_in_the_bundled_server_and_answers(artifacts, images, tiny, tmp_path):
    from visiondrop_edge.runtime.ort_backend import OrtBackend

    repo = tmp_path / "repo"
    written = CliRunner().invoke(cli.cli, ["triton-repo", "--artifacts", str(artifacts), "--out", str(repo), "--units", "python",
                                           "--max-new-tokens", str(NEW_TOKENS)])
    assert written.exit_code == 0, written.output
    units = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert units == sorted(["visiondrop", "vision_encoder", "qkv_0"] + [f"prune_{s}" for s in range(3)]
                           + [f"decoder_{g}" for g in range(4)])
    binary, backends, environment = bundled_tritonserver(tmp_path)
    http_port, grpc_port, metrics_port = free_ports(3)
    log = tmp_path / "triton.log"
    with log.open("w") as output:
        process = subprocess.Popen([str(binary), "--model-repository", str(repo), "--backend-directory", str(backends),
                                    "--http-address", "127.0.0.1", "--http-port", str(http_port), "--grpc-address", "127.0.0.1",
                                    "--grpc-port", str(grpc_port), "--metrics-address", "127.0.0.1",
                                    "--metrics-port", str(metrics_port), "--exit-timeout-secs", "10"],
                                   env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(process, f"127.0.0.1:{http_port}", "visiondrop", log)
        client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            first, again = (ask(client, images["bytes"][2], QUESTIONS[1]) for _ in range(2))
            with pytest.raises(InferenceServerException, match="the prompt is empty"):
                client.infer("visiondrop", request_inputs(images["bytes"][2], b" "), client_timeout=REQUEST_S)
        finally:
            client.close()
    finally:
        assert stop(process) == 0
    backend = OrtBackend(artifacts, provider="cpu")
    spec = backend.spec
    pixels = pixel_values(tiny.processor.image_processor, load_images([images["paths"][2]]), spec.prompt_template)
    batch = build_prompts(tiny.tokenizer, spec.prompt_template, [QUESTIONS[1]], spec.schedule.image_tokens,
                          spec.image_token_id, spec.pad_token_id)
    direct = greedy_generate(backend, pixels, batch, NEW_TOKENS)
    tokens = direct.tokens[0].tolist()
    length = comparable(tokens, direct.step_logits)
    assert first["tokens"][:length] == tokens[:length] and again["tokens"] == first["tokens"]
    assert not first["hit"] and again["hit"]  # the second question on the image reused its prefix in the BLS model
    assert first["kept"] == [48, 35, 26, 19]  # budget 32 on 8 layers: 42+6, then 30+5, 22+4, 16+3


def test_triton_repo_tensorrt_units_follow_the_manifest(artifacts):
    """What Triton's TensorRT backend is given, checked against the artifacts' manifest (no TensorRT here)."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    from visiondrop_edge.manifest import read_manifest
    from visiondrop_edge.runtime.triton_repo import unit_config

    manifest = read_manifest(artifacts)
    entry = manifest.graph("decoder", 1)
    config = json_format.ParseDict(unit_config(entry, "tensorrt", profiles=2), model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 0
    assert list(config.instance_group[0].profile) == ["0", "1"]
    assert [t.name for t in config.input] == [t["name"] for t in entry.inputs]
    for ours, recorded in zip(list(config.input) + list(config.output), entry.inputs + entry.outputs):
        assert list(ours.dims) == [d if isinstance(d, int) else -1 for d in recorded["shape"]]
        expected = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}[recorded["dtype"]]
        assert model_config_pb2.DataType.Name(ours.data_type) == expected


def test_triton_repo_refuses_what_its_units_cannot_run(artifacts, tmp_path):
    result = CliRunner().invoke(cli.cli, ["triton-repo", "--artifacts", str(artifacts), "--out", str(tmp_path / "r"),
                                          "--units", "tensorrt"])
    assert result.exit_code == 2 and "give --engines DIR" in result.output and not (tmp_path / "r").exists()


def test_prune_units_spin_within_their_run_and_the_rest_never_spin(artifacts, tmp_path):
    """The thread-pool settings per graph role, the same on ONNX Runtime here and in a Triton
    repo's Python units: prune graphs spin inside a run and stop at its end, every other unit's
    threads sleep when idle (a CPU shared with the application)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from visiondrop_edge.runtime.ort_backend import OrtBackend

    spin, stop = "session.intra_op.allow_spinning", "session.force_spinning_stop"
    expected = {"prune": {spin: "1", stop: "1"}, "other": {spin: "0"}}
    backend = OrtBackend(artifacts, provider="cpu")
    repo = tmp_path / "repo"
    written = CliRunner().invoke(cli.cli, ["triton-repo", "--artifacts", str(artifacts), "--out", str(repo), "--units", "python"])
    assert written.exit_code == 0, written.output
    for entry in backend.manifest.graphs:
        wanted = expected["prune" if entry.name.startswith("prune_") else "other"]
        options = backend.sessions[entry.name].get_session_options()
        assert {key: options.get_session_config_entry(key) for key in wanted} == wanted, entry.name
        config = text_format.Parse((repo / entry.name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert json.loads(config.parameters["session_config"].string_value) == wanted, entry.name
