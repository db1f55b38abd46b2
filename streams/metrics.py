"""Prometheus metrics every stage reports (served by streams/health.py, with /healthz, /readyz).

One registry per process; names are stable API for the Grafana dashboards in ops/grafana.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

RECORDS_IN = Counter("promptcot_records_in_total", "Records consumed by a stage", ["stage"])
RECORDS_OUT = Counter(
    "promptcot_records_out_total", "Records produced by a stage", ["stage", "topic"]
)
REJECTED = Counter(
    "promptcot_rejected_total", "Rejections by stage and reason code", ["stage", "reason"]
)
JUDGED_PAIRS = Counter(
    "promptcot_filter_judged_pairs_total",
    "Candidate/benchmark pairs the decontamination judge decided, by verdict "
    "(same, different, malformed: an unreadable model answer, decided by the cheap signal)",
    ["verdict"],
)
ACCEPTED = Counter("promptcot_accepted_total", "Problems accepted by the verifier", ["domain"])
DEAD_LETTERS = Counter(
    "promptcot_dead_letters_total",
    "Unreadable records sent to the dead-letter topic",
    ["stage", "reason"],
)
BATCH_SECONDS = Histogram(
    "promptcot_batch_seconds",
    "Time to process one micro-batch",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
BATCH_SIZE = Histogram(
    "promptcot_batch_size", "Records per micro-batch", ["stage"], buckets=(1, 2, 4, 8, 16, 32, 64)
)
MODEL_TOKENS = Counter("promptcot_model_tokens_total", "Tokens through a model", ["role", "kind"])
MODEL_TEXT_REPLACED = Counter(
    "promptcot_model_text_replaced_total",
    "Code points of model output that were not valid UTF-8 (lone surrogates), replaced by U+FFFD "
    "where a backend hands the text back",
)
PASS_RATE = Histogram(
    "promptcot_pass_rate",
    "Solver pass rate of verified candidates",
    ["domain"],
    buckets=(0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
)
IN_FLIGHT = Gauge("promptcot_concept_sets_in_flight", "Concept sets issued without a verdict")
DIVERSITY = Gauge(
    "promptcot_diversity", "Diversity of accepted problems over the last window", ["measure"]
)
# Drift of the accepted problems over the last verify.drift_window of them, per domain, set by
# the verify stage (workers/drift.py): what long self-play runs are reported to drift towards.
ACCEPTED_DIVERSITY = Gauge(
    "promptcot_accepted_diversity",
    "Mean pairwise distance of the last accepted problems (hashed word bigrams; 0 = all alike)",
    ["domain"],
)
ACCEPTED_MEAN_WORDS = Gauge(
    "promptcot_accepted_mean_words",
    "Mean length in words of the last accepted problems",
    ["domain"],
)
ACCEPTED_TRIVIAL_ANSWERS = Gauge(
    "promptcot_accepted_trivial_answer_share",
    "Share of the last accepted problems whose reference is 0, 1 or a number the problem states",
    ["domain"],
)
DESIGNER_AGREEMENT = Gauge(
    "promptcot_accepted_designer_agreement",
    "Share of the last accepted problems with a designer's answer whose solver plurality agrees "
    "with it",
    ["domain"],
)
SANDBOX_RUNS = Counter("promptcot_sandbox_runs_total", "Sandboxed program runs", ["outcome"])
# Progress of each stage, set by the runtime (workers/runtime.py, workers/agent.py): what "alive
# but stuck" alerts and health checks read.
LAST_PROGRESS = Gauge(
    "promptcot_stage_last_progress_timestamp_seconds",
    "Unix time a stage last finished input records (outputs acknowledged, offsets committable)",
    ["stage"],
)
PENDING = Gauge(
    "promptcot_stage_pending_records",
    "Input records a stage has received and not finished (in flight or waiting)",
    ["stage"],
)
MODEL_RELOADS = Counter(
    "promptcot_model_reloads_total", "New weights served by this process, per role", ["role"]
)
RETRIES = Counter(
    "promptcot_stage_retries_total",
    "Retries by stage and kind: transient (a model server or disk away), error (a record that "
    "raised), runtime (a chunk that could not be sent or journaled)",
    ["stage", "kind"],
)
# Written by each worker process for its own consumer group (streams/lag.py). Every replica of a
# stage reports every partition, so aggregate with max over instances, then sum.
CONSUMER_LAG = Gauge(
    "promptcot_consumer_lag",
    "Records of an input topic partition not yet committed by the stage's consumer group",
    ["group", "stage", "topic", "partition"],
)
# The TRAINER_* gauges are set by the trainer only (trainer/updates.py, from every update it
# announces); MODEL_VERSION by it and by the reload follower (workers/reload.py) for the version a
# process serves; EVAL_ACCURACY and EVAL_GOLD_NLL by eval (trainer/evaluate.py).
TRAINER_LOSS = Gauge(
    "promptcot_trainer_loss", "Mean training loss of the last update", ["role", "step"]
)
TRAINER_HELDOUT_NLL = Gauge(
    "promptcot_trainer_heldout_nll",
    "Per-token NLL of held-out items after the last update: seed problems under p_θ (cold start,"
    " M-step), verified traces under the solver (SFT); unset until the held-out pool has items",
    ["role"],
)
TRAINER_REWARD = Gauge(
    "promptcot_trainer_reward",
    "Mean reward R(z) of q_φ's greedy rationales on held-out seeds after the last E-step",
    ["role"],
)
TRAINER_RATIONALE_TOKENS = Gauge(
    "promptcot_trainer_rationale_tokens",
    "Mean length in tokens of q_φ's greedy rationales on held-out seeds after the last E-step, "
    "beside promptcot_trainer_reward (unset until the held-out pool has items)",
    ["role"],
)
TRAINER_MARGIN = Gauge(
    "promptcot_trainer_margin",
    "Mean log-likelihood margin chosen - rejected on held-out pairs after the last DPO update",
    ["role"],
)
MODEL_VERSION = Gauge(
    "promptcot_model_version",
    "Checkpoint version number (N of <role>/vNNNN-<step>) this process last announced (trainer) "
    "or now serves (workers/reload.py); absent until either happens",
    ["role"],
)
MATH_ORACLE_TIMEOUTS = Counter(
    "promptcot_math_oracle_timeouts_total",
    "Math equivalence checks abandoned at the per-check time bound (verdict: not equivalent)",
)
MATH_ORACLE_CALLS = Counter(
    "promptcot_math_oracle_calls_total",
    "Math equivalence checks by how the verdict was reached (text, cache, too_long, garbled, "
    "math_verify, timeout, crashed, hostile, over_budget)",
    ["outcome"],
)
EVAL_ACCURACY = Gauge(
    "promptcot_eval_accuracy",
    "Share of benchmark problems solved (the solver template, greedy), per model version",
    ["benchmark", "role", "version"],
)
EVAL_GOLD_NLL = Gauge(
    "promptcot_eval_gold_nll",
    "Per-token NLL of the benchmark's gold solutions under the model (teacher-forced after the "
    "solver template), per model version",
    ["benchmark", "role", "version"],
)


# The memory of this process, read at each scrape (streams/memory.py has what each figure means;
# docs/models.md, "Where the weights are").
PROCESS_RESIDENT = "promptcot_process_resident_bytes"
PROCESS_MALLOC = "promptcot_process_malloc_bytes"
MODEL_WEIGHT_BYTES = "promptcot_model_weight_bytes"


class _MemoryCollector:
    def collect(self):
        from streams import memory

        resident = memory.resident_split()
        if resident is not None:
            family = GaugeMetricFamily(
                PROCESS_RESIDENT,
                "Resident set of this process by kind: anon (heap, tensors made at run time), "
                "file (mapped files: model weights mapped from their safetensors), shmem",
                labels=["kind"],
            )
            for kind, value in resident.items():
                family.add_metric([kind], value)
            yield family
        heap = memory.malloc_bytes()
        if heap is not None:
            family = GaugeMetricFamily(
                PROCESS_MALLOC,
                "The C heap as glibc sees it: in_use (handed out), free (freed but still held "
                "by the allocator), mmapped (large chunks)",
                labels=["kind"],
            )
            for kind, value in heap.items():
                family.add_metric([kind], value)
            yield family
        weights = GaugeMetricFamily(
            MODEL_WEIGHT_BYTES,
            "Tensor bytes (weights, buffers, gradients, optimizer state) a component of this "
            "process holds: own (counted here first) or shared (aliased from another component, "
            "e.g. a shared base model)",
            labels=["component", "sharing"],
        )
        for row in memory.tensor_account():
            weights.add_metric([row.component, "own"], row.own)
            weights.add_metric([row.component, "shared"], row.shared)
        yield weights


REGISTRY.register(_MemoryCollector())


def counter_samples(counter: Counter) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every child of a counter."""
    return [
        (sample.labels, sample.value)
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    ]


def gauge_samples(gauge: Gauge) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every child of a gauge."""
    return [
        (sample.labels, sample.value) for metric in gauge.collect() for sample in metric.samples
    ]


def counter_value(counter: Counter, **labels: str) -> float:
    """Sum over the children matching ``labels`` (0 if none); for summaries and tests."""
    return sum(
        value
        for child, value in counter_samples(counter)
        if all(child.get(k) == v for k, v in labels.items())
    )
