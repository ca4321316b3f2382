"""Server counters and their Prometheus text exposition (format 0.0.4, written by hand).

Updated from the request handlers (event loop and handler threads) and from the engine's worker
thread, hence one lock. Exposed series (prefix ``grouprank_``): ``requests_total{endpoint,status}``,
``errors_total{type}``, ``queue_depth`` (generations queued or running), ``batch_size`` (histogram of
generations per ``Sampler.generate`` call), ``prompt_tokens_total``, ``generated_tokens_total``,
``generate_seconds_total`` and ``generated_tokens_per_second`` (over all generate calls so far).
"""

from __future__ import annotations

import threading
from collections import Counter

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[str] = Counter()
        self.queue_depth = 0
        self.batch_counts = [0] * len(BATCH_BUCKETS)  # non-cumulative, per upper bound
        self.batch_over = 0  # above the last bucket
        self.batches = 0
        self.batch_rows = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generate_seconds = 0.0

    def request(self, endpoint: str, status: int, error_type: str | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if error_type is not None:
                self.errors[error_type] += 1

    def set_queue_depth(self, depth: int) -> None:
        with self._lock:
            self.queue_depth = depth

    def batch(self, rows: int, prompt_tokens: int, generated_tokens: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.batch_rows += rows
            slot = next((i for i, b in enumerate(BATCH_BUCKETS) if rows <= b), None)
            if slot is None:
                self.batch_over += 1
            else:
                self.batch_counts[slot] += 1
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated_tokens
            self.generate_seconds += seconds

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP grouprank_requests_total HTTP requests answered, by endpoint and status.",
                "# TYPE grouprank_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'grouprank_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
            lines += [
                "# HELP grouprank_errors_total Error responses, by error type.",
                "# TYPE grouprank_errors_total counter",
            ]
            for kind, count in sorted(self.errors.items()):
                lines.append(f'grouprank_errors_total{{type="{kind}"}} {count}')
            lines += [
                "# HELP grouprank_queue_depth Generations queued or running.",
                "# TYPE grouprank_queue_depth gauge",
                f"grouprank_queue_depth {self.queue_depth}",
                "# HELP grouprank_batch_size Generations per Sampler.generate call.",
                "# TYPE grouprank_batch_size histogram",
            ]
            cumulative = 0
            for bound, count in zip(BATCH_BUCKETS, self.batch_counts):
                cumulative += count
                lines.append(f'grouprank_batch_size_bucket{{le="{bound}"}} {cumulative}')
            lines.append(f'grouprank_batch_size_bucket{{le="+Inf"}} {cumulative + self.batch_over}')
            lines.append(f"grouprank_batch_size_sum {self.batch_rows}")
            lines.append(f"grouprank_batch_size_count {self.batches}")
            rate = self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0
            for name, kind, value, text in (
                ("prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens prefilled."),
                ("generated_tokens_total", "counter", self.generated_tokens, "Tokens generated."),
                ("generate_seconds_total", "counter", round(self.generate_seconds, 6), "Seconds in generate calls."),
                ("generated_tokens_per_second", "gauge", round(rate, 3), "Generated tokens per generate second."),
            ):
                lines += [f"# HELP grouprank_{name} {text}", f"# TYPE grouprank_{name} {kind}"]
                lines.append(f"grouprank_{name} {value}")
            return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """``{series (with labels): value}`` of an exposition text (tests and the benchmark read /metrics)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
