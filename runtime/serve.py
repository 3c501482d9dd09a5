"""Serve a :class:`~.session.Session` on Triton Inference Server, through PyTriton.

One Triton server (the binary the ``nvidia-pytriton`` wheel ships), three models and a counter:

- ``visiondrop``, what clients call: a Triton ensemble of the two models below.
- ``visiondrop_prepare`` takes one request per execution (no batcher), so a malformed request
  (no image, undecodable bytes, an empty or oversize prompt) fails alone, with a Triton error
  saying why, while the server goes on. It decodes the image into pixel values and checks the
  prompt against the positions the model (or the exported graphs) support.
- ``visiondrop_generate`` sits behind Triton's dynamic batcher. One execution encodes every
  image of the batch that is not in the prefix cache in one vision + prefill batch (a cached
  image skips both), then prefills every question at once on top of its image's prefix and
  decodes the rows together.
- ``visiondrop_stream``, what clients call to get tokens as they are produced: a decoupled
  model (gRPC streaming) with the inputs of ``visiondrop``, one request at a time, that checks
  it as ``visiondrop_prepare`` does and sends one response per generated token. Its greedy
  steps interleave with other streams' and with the generate batches (one lock on the session).
- ``visiondrop_stats`` answers the prefix cache's and the batcher's counters as JSON.

PyTriton answers or fails a whole batch at once, hence the split: everything that can refuse
a request runs where the request is alone. Triton adds its own metrics (request counts,
batch executions, queue and compute times) on the metrics port.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import signal
import sysconfig
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from visiondrop_edge.errors import InputError, UserError
from visiondrop_edge.prompt import SIXTEEN_BIT_MODES, pixel_values, split_prompt

from .base import Backend, ModelSpec
from .session import PrefixState, Session

LOGGER = logging.getLogger("visiondrop")

MODEL, PREPARE, GENERATE, STREAM, STATS = ("visiondrop", "visiondrop_prepare", "visiondrop_generate", "visiondrop_stream",
                                           "visiondrop_stats")
# What a client sends and gets back (names and Triton types; shapes are per request, batch dimension first).
REQUEST_INPUTS = {"image": ("TYPE_STRING", [1]), "prompt": ("TYPE_STRING", [1]), "max_new_tokens": ("TYPE_INT32", [1])}
RESPONSE_OUTPUTS = {"text": ("TYPE_STRING", [1]), "tokens": ("TYPE_INT64", [-1]), "kept_tokens": ("TYPE_INT32", [-1]),
                    "prefix_cache_hit": ("TYPE_BOOL", [1])}
NUMPY_TYPES = {"TYPE_STRING": np.bytes_, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_BOOL": np.bool_,
               "TYPE_FP32": np.float32}


def prepared_tensors(image_size: int) -> dict[str, tuple[str, list[int]]]:
    """What ``visiondrop_prepare`` hands ``visiondrop_generate`` (fixed shapes, so the batcher can group them)."""
    return {"pixel_values": ("TYPE_FP32", [3, image_size, image_size]), "prompt": ("TYPE_STRING", [1]),
            "max_new_tokens": ("TYPE_INT32", [1])}


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8  # rows one generate execution may hold
    batch_delay_us: int = 2000  # how long the batcher may hold a request to fill a batch
    max_new_tokens: int = 32  # for a request that sends none
    max_new_tokens_limit: int = 256  # the most a request may ask for
    prefix_cache_bytes: int = 1 << 30
    log_file: Path | None = None  # Triton's own log


# ------------------------------------------------------------------ requests, without Triton


@dataclass
class Prepared:
    """A checked request row: what ``visiondrop_generate`` receives."""

    pixels: np.ndarray  # [3, H, W] float32, the image processor's output
    prompt: str
    max_new_tokens: int


@dataclass
class Reply:
    text: str
    tokens: list[int]  # up to and including EOS
    kept_tokens: list[int]  # visual tokens into the LLM, then after each LLM stage
    prefix_cache_hit: bool


def decode_image(data: bytes):
    """An encoded image file's bytes as RGB, read as ``prompt.load_images`` reads a file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InputError("the image is empty: send the bytes of a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image = ImageOps.exif_transpose(image)
                if image.mode in SIXTEEN_BIT_MODES:  # 16-bit greyscale: scale to 8 bits, as load_images does
                    values = np.asarray(image, dtype=np.float64)
                    image = Image.fromarray(np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8))
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"the image is too large (PIL's limit is {Image.MAX_IMAGE_PIXELS:,} pixels): downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"the image bytes cannot be decoded ({exc.__class__.__name__}): send a PNG or JPEG file") from None


class RequestChecker:
    """Turns a request's image bytes and prompt into :class:`Prepared`, or refuses it with the reason."""

    def __init__(self, processor, spec: ModelSpec, limit: tuple[int, str], options: ServeOptions):
        self.processor = copy.deepcopy(processor)  # one per thread: fast tokenizers refuse concurrent calls
        self.spec, self.limit, self.options = spec, limit, options

    def __call__(self, image: bytes, prompt: bytes, max_new_tokens: int | None) -> Prepared:
        try:
            text = prompt.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InputError("the prompt is not UTF-8 text") from None
        if not text:
            raise InputError("the prompt is empty: send a question")
        new_tokens = self.options.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= new_tokens <= self.options.max_new_tokens_limit:
            raise InputError(f"max_new_tokens must be 1..{self.options.max_new_tokens_limit} (got {new_tokens})")
        split = split_prompt(self.processor.tokenizer, self.spec.prompt_template, text, self.spec.image_token_id)
        needed = len(split.prefix_ids) + self.spec.schedule.image_tokens + len(split.suffix_ids) + new_tokens
        limit, limit_name = self.limit
        if needed > limit:
            raise InputError(f"the prompt takes {needed - new_tokens} tokens (image included) and up to {new_tokens} new "
                             f"ones: {needed} positions, more than the {limit} of {limit_name}; shorten the prompt")
        pixels = pixel_values(self.processor.image_processor, [decode_image(image)], self.spec.prompt_template)[0]
        return Prepared(pixels.numpy().astype(np.float32, copy=False), text, new_tokens)


@dataclass
class Counters:
    """What the server did, for ``visiondrop_stats`` (thread-safe)."""

    requests: int = 0  # rows answered
    refused: int = 0  # requests ``visiondrop_prepare`` refused
    batches: int = 0  # generate executions
    largest_batch: int = 0
    in_flight: int = 0  # rows inside a generate execution now
    streams: int = 0  # streams that sent their last token
    streaming: int = 0  # streams open now (each holds its answer's caches)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"requests": self.requests, "refused": self.refused, "batches": self.batches,
                    "largest_batch": self.largest_batch, "in_flight": self.in_flight, "streams": self.streams,
                    "streaming": self.streaming}


def kept_counts(prefix) -> list[int]:
    """The visual tokens the LLM received, then those kept (dominant + contextual) after each LLM stage."""
    return [prefix.vision.image_embeds.shape[1]] + [s.kept_index.shape[1] + s.target_index.shape[1] for s in prefix.stages]


def encode_images(session: Session, images: Sequence[np.ndarray]) -> list[tuple[PrefixState, bool]]:
    """Each image's prefix and whether it came from the prefix cache: the distinct images that
    are not cached are encoded once each, in one vision + prefill batch."""
    digests = [hashlib.sha256(image.tobytes()).digest() for image in images]
    distinct = list(dict.fromkeys(digests))
    cached = {id(entry) for entry in session.cache.entries.values()}
    first = {digest: digests.index(digest) for digest in distinct}
    prefixes = dict(zip(distinct, session.encode_prefix(torch.from_numpy(np.stack([images[first[d]] for d in distinct])))))
    return [(prefixes[d], id(prefixes[d]) in cached) for d in digests]


def answer_batch(session: Session, rows: Sequence[Prepared]) -> list[Reply]:
    """Answer every row in one batch: each distinct image is encoded once (or found in the
    cache), the questions are prefilled together on their images' prefixes and decoded together."""
    encoded = encode_images(session, [row.pixels for row in rows])
    answer = session.answer([prefix for prefix, _ in encoded], [row.prompt for row in rows], max(row.max_new_tokens for row in rows))
    eos = session.backend.spec.eos_token_id
    replies = []
    for index, (row, (prefix, hit)) in enumerate(zip(rows, encoded)):
        tokens = answer.tokens[index, :row.max_new_tokens].tolist()
        if eos is not None and eos in tokens:  # after a row's EOS come pads (the batch went on)
            tokens = tokens[:tokens.index(eos) + 1]
        text = session.tokenizer.decode(tokens, skip_special_tokens=True)
        replies.append(Reply(text, tokens, kept_counts(prefix), hit))
    return replies


class TextPieces:
    """The text each streamed token adds, so that the pieces add up to the answer's text.

    A piece is the decoded answer so far less what was already sent (a token's text depends
    on its neighbours: SentencePiece's leading spaces, bytes of one character split over
    tokens); it is held back while the text ends in an incomplete character, and the last
    token sends the rest.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

    def add(self, token: int, last: bool) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.startswith(self.sent) or (text.endswith("\ufffd") and not last):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


def locked(lock: threading.Lock, iterator: Iterator) -> Iterator:
    """``iterator``'s items, each computed while holding ``lock`` (released between items)."""
    while True:
        with lock:
            item = next(iterator, None)
        if item is None:
            return
        yield item


def reply_arrays(replies: Sequence[Reply], pad_token_id: int) -> dict[str, np.ndarray]:
    """One request's replies as its output tensors (``tokens`` padded on the right to the longest row)."""
    tokens = np.full((len(replies), max(len(reply.tokens) for reply in replies)), pad_token_id, dtype=np.int64)
    for row, reply in enumerate(replies):
        tokens[row, :len(reply.tokens)] = reply.tokens
    return {
        "text": np.array([[reply.text.encode()] for reply in replies], dtype=np.object_),
        "tokens": tokens,
        "kept_tokens": np.array([reply.kept_tokens for reply in replies], dtype=np.int32),
        "prefix_cache_hit": np.array([[reply.prefix_cache_hit] for reply in replies], dtype=np.bool_),
    }


def request_rows(check: RequestChecker, images: Sequence, prompts: Sequence, new_tokens: Sequence) -> list[Prepared]:
    """A request's rows, checked (raises :class:`UserError` with the reason for the first bad one)."""
    for name, column in (("image", images), ("prompt", prompts)):
        if any(value is None for value in column):
            raise InputError(f"the request has no '{name}' input: send the image file's bytes as 'image' and the "
                             "question as 'prompt' (BYTES)")
    return [check(bytes(image), bytes(prompt), None if new is None else int(new))
            for image, prompt, new in zip(images, prompts, new_tokens)]


# ------------------------------------------------------------------ the PyTriton models


def _column(request, name: str) -> list:
    """A request input's rows (batch dimension first), or Nones where an optional input is absent."""
    if name not in request.data:
        return [None] * max([len(value) for value in request.data.values()] + [1])
    return [row[0] if row.ndim else row for row in request.data[name]]


def checked_rows(check: RequestChecker, request, counters: Counters, what: str) -> list[Prepared]:
    """A Triton request's rows, checked; a refusal is counted and logged, then raised to Triton
    (which answers that request alone with the error)."""
    try:
        return request_rows(check, _column(request, "image"), _column(request, "prompt"), _column(request, "max_new_tokens"))
    except UserError as exc:
        with counters.lock:
            counters.refused += 1
        LOGGER.info("refused %s: %s", what, exc)
        raise


class PrepareModel:
    """``visiondrop_prepare``: one request at a time; raises (a Triton error for that request) on bad input."""

    def __init__(self, checker: RequestChecker, counters: Counters):
        self.checker, self.counters = checker, counters

    def __call__(self, requests) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:  # one request (no batcher), which may hold several rows
            rows = checked_rows(self.checker, request, self.counters, "a request")
            responses.append({
                "pixel_values": np.stack([row.pixels for row in rows]),
                "prompt": np.array([[row.prompt.encode()] for row in rows], dtype=np.object_),
                "max_new_tokens": np.array([[row.max_new_tokens] for row in rows], dtype=np.int32),
            })
        return responses


class GenerateModel:
    """``visiondrop_generate``: a dynamic batch of prepared requests, answered in one :func:`answer_batch`."""

    def __init__(self, session: Session, compute: threading.Lock, counters: Counters):
        self.session, self.compute, self.counters = session, compute, counters

    def __call__(self, requests) -> list[dict[str, np.ndarray]]:
        rows, owners = [], []
        for number, request in enumerate(requests):
            for pixels, prompt, new in zip(request.data["pixel_values"], _column(request, "prompt"),
                                           _column(request, "max_new_tokens")):
                rows.append(Prepared(pixels, bytes(prompt).decode(), int(new)))
                owners.append(number)
        with self.counters.lock:
            self.counters.in_flight += len(rows)
        try:
            with self.compute:
                replies = answer_batch(self.session, rows)
        except Exception:
            LOGGER.exception("a batch of %d request(s) failed", len(requests))
            raise
        finally:
            with self.counters.lock:
                self.counters.in_flight -= len(rows)
        with self.counters.lock:
            self.counters.requests += len(rows)
            self.counters.batches += 1
            self.counters.largest_batch = max(self.counters.largest_batch, len(rows))
        pad = self.session.backend.spec.pad_token_id
        return [reply_arrays([reply for reply, owner in zip(replies, owners) if owner == number], pad)
                for number in range(len(requests))]


class StreamModel:
    """``visiondrop_stream`` (decoupled): one request, checked alone, then one response per token.

    Each response holds that token (``tokens``), the text it adds (``text``; the pieces add up
    to the answer) and the request's ``kept_tokens`` and ``prefix_cache_hit``. The answer's
    caches live in this generator only: when it ends, or is closed, they are gone.
    """

    def __init__(self, session: Session, checker: RequestChecker, compute: threading.Lock, counters: Counters):
        self.session, self.checker, self.compute, self.counters = session, checker, compute, counters

    def __call__(self, requests) -> Iterator[list[dict[str, np.ndarray]]]:
        [request] = requests  # max_batch_size 1 and no batcher: Triton hands over one request of one row
        [row] = checked_rows(self.checker, request, self.counters, "a stream")
        with self.counters.lock:
            self.counters.streaming += 1
        try:
            with self.compute:
                [(prefix, hit)] = encode_images(self.session, [row.pixels])
            pieces, kept = TextPieces(self.checker.processor.tokenizer), kept_counts(prefix)
            pad = self.session.backend.spec.pad_token_id
            for step in locked(self.compute, self.session.stream(prefix, row.prompt, row.max_new_tokens)):
                token = int(step.tokens[0])
                yield [reply_arrays([Reply(pieces.add(token, step.last), [token], kept, hit)], pad)]
                if step.last:
                    with self.counters.lock:
                        self.counters.streams += 1
        finally:
            with self.counters.lock:
                self.counters.streaming -= 1


class StatsModel:
    """``visiondrop_stats``: the prefix cache's and the batcher's counters as one JSON string."""

    def __init__(self, session: Session, compute: threading.Lock, counters: Counters):
        self.session, self.compute, self.counters = session, compute, counters

    def report(self) -> dict[str, Any]:
        with self.compute:  # the cache changes only under this lock
            cache = self.session.cache.stats()
        return {"prefix_cache": cache, "server": self.counters.snapshot()}

    def __call__(self, requests) -> list[dict[str, np.ndarray]]:
        text = json.dumps(self.report()).encode()
        return [{"stats": np.array([[text]] * len(next(iter(r.data.values()))), dtype=np.bytes_)} for r in requests]


# ------------------------------------------------------------------ the server


def python_backend_environment(environment: dict[str, str]) -> dict[str, str]:
    """``environment`` for Triton with this interpreter's libpython first on the loader path.

    Triton's Python-backend stub links ``libpython3.X.so.1.0`` and imports this interpreter's
    standard library; the system's library of another 3.X build breaks it at model load
    (``'_thread.RLock' object has no attribute '_recursion_count'`` for a 3.11.2 library under
    3.11.7's modules), so the stub must load the library this interpreter was built with.
    """
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    updated = dict(environment)
    if libdir and soname and (Path(libdir) / soname).is_file():
        updated["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, environment.get("LD_LIBRARY_PATH", "")) if p)
    else:
        LOGGER.warning("this Python has no shared %s in %s: Triton's Python backend will load the system's, which "
                       "must be the same Python build", soname or "libpython", libdir)
    return updated


def check_ports(options: ServeOptions) -> None:
    """Refuse a port another program holds before anything loads (Triton would fail late and obscurely)."""
    import socket

    for option, port in (("http_port", options.http_port), ("grpc_port", options.grpc_port),
                         ("metrics_port", options.metrics_port)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((options.host, port))
            except OSError as exc:
                raise UserError.naming("cannot listen on {address} ({reason}): choose another {" + option + "}",
                                       address=f"{options.host}:{port}", reason=exc.strerror) from None
    if len({options.http_port, options.grpc_port, options.metrics_port}) < 3:
        raise UserError.naming("{http_port}, {grpc_port} and {metrics_port} must differ")


def ensemble_config(max_batch: int) -> dict[str, Any]:
    """The client-facing ``visiondrop`` model: prepare (alone), then generate (batched)."""
    def tensors(table, optional=()):
        return [{"name": name, "data_type": kind, "dims": dims, **({"optional": True} if name in optional else {})}
                for name, (kind, dims) in table.items()]

    return {  # every input optional: a request without one reaches prepare, which says what is missing
        "name": MODEL, "platform": "ensemble", "max_batch_size": max_batch,
        "input": tensors(REQUEST_INPUTS, optional=REQUEST_INPUTS), "output": tensors(RESPONSE_OUTPUTS),
        "ensemble_scheduling": {"step": [
            {"model_name": PREPARE, "model_version": -1, "input_map": {name: name for name in REQUEST_INPUTS},
             "output_map": {name: f"_{name}" for name in prepared_tensors(0)}},
            {"model_name": GENERATE, "model_version": -1, "input_map": {name: f"_{name}" for name in prepared_tensors(0)},
             "output_map": {name: name for name in RESPONSE_OUTPUTS}},
        ]},
    }


def pytriton_tensors(table: dict[str, tuple[str, list[int]]], optional: bool = False) -> list:
    """PyTriton's tensor specs of a name -> (Triton type, dims) table."""
    from pytriton.model_config import Tensor

    return [Tensor(name=name, dtype=NUMPY_TYPES[kind], shape=tuple(dims), optional=optional) for name, (kind, dims) in table.items()]


def write_pbtxt(config: dict[str, Any], path: Path) -> None:
    """A model config (the JSON form of Triton's ModelConfig protobuf) as config.pbtxt."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    path.write_text(text_format.MessageToString(message))


class VisionDropServer:
    """PyTriton's Triton with the VisionDrop models; ``with`` starts it, leaving the block stops it."""

    def __init__(self, backend: Backend, processor, model_id: str, limit: tuple[int, str], options: ServeOptions):
        self.options = options
        self.session = Session(backend, processor, model_id, options.prefix_cache_bytes)
        self.counters = Counters()
        self.compute = threading.Lock()  # one thread at a time runs the session: batches and stream steps interleave
        self.stats = StatsModel(self.session, self.compute, self.counters)
        spec = backend.spec
        # One prepare instance: PyTriton's later instances fetch their setup from the first one's
        # socket, which Triton's parallel instance loading can try before it listens. Each model
        # runs in its own thread, so the stream model checks requests with a checker of its own.
        self.checker = RequestChecker(processor, spec, limit, options)
        self.stream_checker = RequestChecker(processor, spec, limit, options)
        self.image_size = spec.image_size
        self.triton = None

    @property
    def urls(self) -> dict[str, str]:
        o = self.options
        return {"http": f"http://{o.host}:{o.http_port}", "grpc": f"{o.host}:{o.grpc_port}",
                "metrics": f"http://{o.host}:{o.metrics_port}/metrics"}

    def __enter__(self) -> VisionDropServer:
        try:
            from pytriton.model_config import DynamicBatcher, ModelConfig
            from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
        except ImportError as exc:
            raise UserError(f"serving needs nvidia-pytriton and tritonclient ({exc}): "
                            "pip install -r requirements.txt -c constraints-cpu.txt") from None

        logging.getLogger("pytriton").setLevel(logging.ERROR)  # a refused request is logged once, by us
        o = self.options
        config = TritonConfig(http_address=o.host, grpc_address=o.host, metrics_address=o.host, http_port=o.http_port,
                              grpc_port=o.grpc_port, metrics_port=o.metrics_port, log_file=o.log_file,
                              exit_timeout_secs=10, allow_gpu_metrics=torch.cuda.is_available())
        saved = dict(os.environ)
        os.environ.update(python_backend_environment(saved))  # PyTriton hands its environment to tritonserver
        try:
            # The local model store holds every model's files before tritonserver starts, so
            # the ensemble finds its steps when Triton loads the repository.
            self.triton = Triton(config=config, triton_lifecycle_policy=TritonLifecyclePolicy(
                launch_triton_on_startup=False, local_model_store=True))
            self.triton.__enter__()
            prepared = pytriton_tensors(prepared_tensors(self.image_size))
            self.triton.bind(model_name=PREPARE, infer_func=PrepareModel(self.checker, self.counters),
                             inputs=pytriton_tensors(REQUEST_INPUTS, optional=True), outputs=prepared,
                             config=ModelConfig(max_batch_size=o.max_batch, batcher=None))
            self.triton.bind(model_name=GENERATE, infer_func=GenerateModel(self.session, self.compute, self.counters),
                             inputs=prepared, outputs=pytriton_tensors(RESPONSE_OUTPUTS), config=ModelConfig(
                                 max_batch_size=o.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=o.batch_delay_us)))
            self.triton.bind(model_name=STREAM, infer_func=StreamModel(self.session, self.stream_checker, self.compute, self.counters),
                             inputs=pytriton_tensors(REQUEST_INPUTS, optional=True), outputs=pytriton_tensors(RESPONSE_OUTPUTS),
                             config=ModelConfig(max_batch_size=1, batcher=None, decoupled=True))
            self.triton.bind(model_name=STATS, infer_func=self.stats, inputs=pytriton_tensors({"query": ("TYPE_STRING", [1])}),
                             outputs=pytriton_tensors({"stats": ("TYPE_STRING", [1])}), config=ModelConfig(max_batch_size=1, batcher=None))
            ensemble = self.triton._workspace.model_store_path / MODEL  # PyTriton names no public accessor for it
            (ensemble / "1").mkdir(parents=True)
            write_pbtxt(ensemble_config(o.max_batch), ensemble / "config.pbtxt")
            try:
                self.triton.run()
            except Exception as exc:  # PyTriton's own errors: the cause is in Triton's log
                where = f"see Triton's log {o.log_file}" if o.log_file else "run with --log-file to see Triton's log"
                raise UserError(f"Triton Inference Server did not start ({type(exc).__name__}: {exc}); {where}") from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return self

    def serve(self, on_ready: Callable[[], None]) -> None:
        """Start, call ``on_ready``, serve until SIGINT or SIGTERM or Triton dies, and stop.

        Both signals stop cleanly (in-flight requests finish first), also while Triton is still
        starting: a supervisor may stop a server that has not finished loading. A signal then
        waits for the start to finish: interrupting PyTriton while it connects its models left
        tritonserver stuck in their loading until PyTriton killed it 30 s later (seen in 2 of 3
        stops here, 1 s otherwise). A second signal during the start interrupts it anyway.
        """
        starting, held = True, False

        def on_signal(signum, frame):
            nonlocal held
            if starting and not held:
                held = True
                return
            raise KeyboardInterrupt

        previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self:
                starting = False
                if held:  # asked to stop while starting: leaving the block stops Triton
                    return
                on_ready()
                self.triton.serve()  # returns on KeyboardInterrupt (from on_signal), after stopping Triton
        except KeyboardInterrupt:  # a second signal while starting: leaving the block stopped Triton
            pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def __exit__(self, *exc_info) -> None:
        if self.triton is not None:
            self.triton.stop()
            self.triton = None
