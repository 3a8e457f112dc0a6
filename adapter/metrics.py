"""`/v1/metrics`: Prometheus text with NIM's (vLLM's, without the `vllm:` prefix) metric names.

- `num_requests_running`, `num_requests_waiting` (gauges): read at scrape time from Triton's metrics endpoint
  (the engine's `llm_engine_requests_running` / `_waiting`), so they count every client of the engine, gRPC ones
  included. When Triton's endpoint cannot be read, the two are left out of that scrape (a gap, not a lie).
- `prompt_tokens_total`, `generation_tokens_total` (counters): prompt tokens once per prompt (as `usage`
  counts them), generated tokens of every sampled sequence (best_of's discarded ones too).
- `prefix_cache_queries_total`, `prefix_cache_hits_total` (counters, vLLM's): the same prompt tokens, and those of
  them the engine took from its KV cache (`usage.prompt_tokens_details.cached_tokens`); only from an engine that
  reports them.
- `time_to_first_token_seconds`, `time_per_output_token_seconds`, `e2e_request_latency_seconds` (histograms),
  `request_success_total{finished_reason}` (counter): one observation per engine sequence (a choice) that ran
  to its end; requests that failed or whose client went away are not counted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("adapter.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)

# Triton's engine gauges -> ours.
ENGINE_GAUGES = {
    "llm_engine_requests_running": ("num_requests_running", "Requests in the engine's running batch."),
    "llm_engine_requests_waiting": ("num_requests_waiting", "Requests waiting for a free engine slot."),
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def parse_engine_gauges(text: str) -> dict[str, float]:
    """Sum each engine gauge over its label sets in Prometheus text."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) in ENGINE_GAUGES:
            try:
                values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
            except ValueError:
                continue
    return values


class _EngineGauges(Collector):
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.values: dict[str, float] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for source, (name, help_text) in ENGINE_GAUGES.items():
            if source in self.values:
                family = GaugeMetricFamily(name, help_text, labels=["model_name"])
                family.add_metric([self.model_name], self.values[source])
                yield family


class Metrics:
    """The adapter's registry (one per app, so several apps in one process do not collide)."""

    def __init__(self, model_name: str, triton_metrics_url: str | None, timeout_s: float = 2.0):
        self.model_name = model_name
        self.triton_metrics_url = triton_metrics_url
        self.timeout_s = timeout_s
        disable_created_metrics()  # no `_created` series, as vLLM (process-wide; the adapter owns its process)
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated.", labels, registry=r)
        self.prefix_cache_queries = Counter("prefix_cache_queries", "Prompt tokens looked up in the KV cache.",
                                            labels, registry=r)
        self.prefix_cache_hits = Counter("prefix_cache_hits", "Prompt tokens found in the KV cache.", labels,
                                         registry=r)
        self.request_success = Counter("request_success", "Sequences that ran to their end, by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram("time_to_first_token_seconds", "Time to the first token.", labels,
                                             buckets=_TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("time_per_output_token_seconds", "Time per token after the first.",
                                               labels, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("e2e_request_latency_seconds", "Time from request to last token.",
                                             labels, buckets=_E2E_BUCKETS, registry=r)
        self._engine = _EngineGauges(model_name)
        r.register(self._engine)

    def observe_prompt(self, prompt_tokens: int, cached_tokens: int | None) -> None:
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        if cached_tokens is not None:
            self.prefix_cache_queries.labels(self.model_name).inc(prompt_tokens)
            self.prefix_cache_hits.labels(self.model_name).inc(cached_tokens)

    def observe_sequence(self, *, finish_reason: str, output_tokens: int, first_token_s: float | None,
                         e2e_s: float) -> None:
        """One engine sequence that ran to its end: times are seconds from the request's arrival."""
        name = self.model_name
        self.generation_tokens.labels(name).inc(output_tokens)
        self.request_success.labels(name, finish_reason).inc()
        self.e2e_request_latency.labels(name).observe(e2e_s)
        if first_token_s is not None:
            self.time_to_first_token.labels(name).observe(first_token_s)
            if output_tokens > 1:
                self.time_per_output_token.labels(name).observe((e2e_s - first_token_s) / (output_tokens - 1))

    async def refresh_engine_gauges(self) -> None:
        if not self.triton_metrics_url:
            return
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                reply = await client.get(self.triton_metrics_url)
                reply.raise_for_status()
            self._engine.values = parse_engine_gauges(reply.text)
        except httpx.HTTPError as exc:
            logger.warning("cannot read Triton's metrics at %s: %s", self.triton_metrics_url, exc)
            self._engine.values = {}

    async def render(self) -> bytes:
        await self.refresh_engine_gauges()
        return generate_latest(self.registry)
