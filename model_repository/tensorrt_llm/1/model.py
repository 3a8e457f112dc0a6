"""Triton shell over the CPU engine, in the `tensorrt_llm` slot with TensorRT-LLM's tensors.

Requests are handed to the engine's own step loop and answered from it (decoupled), so new requests join
the running batch between decode steps. A request with `stop = true` cancels the running request that has
the same id, as with TensorRT-LLM's backend.
"""

import os
import threading
from dataclasses import dataclass, replace

import torch
import triton_python_backend_utils as pb_utils

from engine import Engine, PromptTooLongError, QueueFullError
from launcher.cpu_cores import parse_cpu_list
from launcher.startup_heap import freeze_startup_heap
from pipeline import engine_io
from pipeline.output_relay import OutputRelay
from pipeline.tensors import InvalidRequest
from pipeline.triton_io import ModelShell, error_response, response

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
GAUGES = {  # engine.stats() key -> Triton metric, on Triton's metrics port
    "running": ("llm_engine_requests_running", "Requests in the engine's running batch"),
    "waiting": ("llm_engine_requests_waiting", "Requests queued for a free engine slot"),
}


@dataclass(eq=False)
class Stream:
    """Where one request's responses go."""

    request: engine_io.EngineRequest
    sender: object  # the request's pb_utils response sender


class TritonPythonModel:
    def initialize(self, args):
        self.shell = ModelShell(args)
        p = self.shell.parameters
        if p["engine_kind"] == "synthetic":
            from bench.synthetic_engine import SyntheticEngine  # benchmarks only: no model behind it

            self.engine = SyntheticEngine(int(p["max_batch_size"]), int(p["max_seq_len"]), int(p["max_queue_size"]),
                                          int(p["stream_interval"]))
        else:
            self.engine = Engine(
                p["model_dir"],
                max_batch_size=int(p["max_batch_size"]),
                max_seq_len=int(p["max_seq_len"]),
                max_queue_size=int(p["max_queue_size"]),
                dtype=getattr(torch, p["dtype"]),
                num_threads=int(p["num_threads"]) or None,
                stream_interval=int(p["stream_interval"]),
                kv_cache_reuse=p["enable_kv_cache_reuse"] == "true",
                cpu_cores=parse_cpu_list(p["cpu_cores"]) if p.get("cpu_cores") else None,
            )
        # Responses are built and sent off the engine thread, coalesced while sending lags.
        self.relay = OutputRelay(self._send)
        self.closed = threading.Event()
        threading.Thread(target=self._publish_stats, name="engine-stats", daemon=True).start()
        freeze_startup_heap()  # the model and torch: a full collection would stall the engine thread

    def _publish_stats(self):
        labels = {"model": self.shell.model_config["name"]}
        # A Metric needs its MetricFamily alive: keep both.
        families = {
            key: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.GAUGE)
            for key, (name, text) in GAUGES.items()
        }
        gauges = {key: family.Metric(labels=labels) for key, family in families.items()}
        published = {}
        server = os.getppid()
        while not self.closed.wait(0.2):
            if os.getppid() != server:
                # tritonserver died without finalizing us; the stub's own exit path can hang on the
                # engine's threads, so leave now rather than linger as an orphan.
                os._exit(1)
            stats = self.engine.stats()
            # Only changes cross to tritonserver: each set() is a message that wakes it on the cores the engine
            # computes on.
            try:
                for key, gauge in gauges.items():
                    if published.get(key) != stats[key]:
                        gauge.set(stats[key])
                        published[key] = stats[key]
            except Exception:  # the server is shutting down: keep watching for its death
                continue

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._start(request, sender)
            except (InvalidRequest, PromptTooLongError, ValueError) as exc:
                sender.send(error_response(str(exc)), flags=FINAL)
            except QueueFullError as exc:
                sender.send(error_response(str(exc), pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
        return None

    def _start(self, request, sender):
        inputs = self.shell.inputs(request)
        if engine_io.is_stop_request(inputs):
            self.engine.cancel(request.request_id())
            sender.send(flags=FINAL)
            return
        parsed = engine_io.parse_request(inputs, request.request_id(), request.requested_output_names())
        stream = Stream(parsed, sender)
        self.engine.submit(parsed.key, parsed.prompt_ids, parsed.params, lambda output: self.relay.put(stream, output))

    def _send(self, stream: Stream, output) -> None:
        if not output.finished and stream.sender.is_cancelled():
            self.engine.cancel(stream.request.key)  # the client closed its stream to this model
            return
        flags = FINAL if output.finished else 0
        if output.finish_reason == "error":
            if output.token_ids:  # tokens produced before the error (held by stream_interval) still go out
                tokens = replace(output, finished=False, finish_reason=None, error=None)
                stream.sender.send(response(engine_io.response_tensors(stream.request, tokens)))
            error = error_response(output.error or "engine error", pb_utils.TritonError.INTERNAL)
            stream.sender.send(error, flags=flags)
        else:
            stream.sender.send(response(engine_io.response_tensors(stream.request, output)), flags=flags)

    def finalize(self):
        self.closed.set()
        self.engine.close()
        self.relay.close()
