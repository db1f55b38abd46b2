"""Build ops/grafana/promptcot.json, the factory's Grafana dashboard, from this file.

    python ops/grafana/build_dashboard.py      # rewrites promptcot.json

Dashboards as code: panels are short declarations, every query names metrics from
streams/metrics.py, and tests/test_dashboards.py runs each query against a real Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("promptcot.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


def panel(
    title: str,
    exprs: dict[str, str],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    w: int = 12,
    h: int = 8,
    description: str = "",
) -> dict:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": DS}
            for i, (legend, expr) in enumerate(exprs.items())
        ],
    }


def row(title: str) -> dict:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"w": 24, "h": 1},
        "panels": [],
    }


# Every replica of a stage reports the lag of every partition of its group (streams/lag.py): the
# max over instances is the partition's lag.
LAG = "max by (group, stage, topic, partition) (promptcot_consumer_lag)"

PANELS = [
    row("Output"),
    panel(
        "Verified problems per hour",
        {
            "{{domain}}": f"sum by (domain) (rate(promptcot_accepted_total[{RI}])) * 3600",
        },
        w=8,
        description="Problems that passed dedup, decontamination and verification.",
    ),
    panel(
        "Acceptance ratio",
        {
            "accepted / candidates": f"sum(rate(promptcot_accepted_total[{RI}])) / "
            "clamp_min(sum(rate(promptcot_records_out_total"
            f'{{stage="generate",topic="candidates"}}[{RI}])), 1e-9)',
        },
        unit="percentunit",
        w=8,
    ),
    panel("Concept sets in flight", {"in flight": "sum(promptcot_concept_sets_in_flight)"}, w=8),
    row("Flow"),
    panel(
        "Records out per second",
        {
            "{{stage}} -> {{topic}}": (
                f"sum by (stage, topic) (rate(promptcot_records_out_total[{RI}]))"
            ),
        },
    ),
    panel(
        "Records in per second",
        {
            "{{stage}}": f"sum by (stage) (rate(promptcot_records_in_total[{RI}]))",
        },
    ),
    panel(
        "Rejections by reason",
        {
            "{{stage}}: {{reason}}": (
                f"sum by (stage, reason) (rate(promptcot_rejected_total[{RI}]))"
            ),
        },
        w=16,
    ),
    panel(
        "Dead letters",
        {
            "{{stage}}: {{reason}}": (
                f"sum by (stage, reason) (increase(promptcot_dead_letters_total[{RI}]))"
            ),
        },
        w=8,
        description="Unreadable records; each is on the dead-letter topic with its payload.",
    ),
    row("Lag and progress"),
    panel(
        "Consumer lag by stage and topic",
        {"{{stage}} <- {{topic}}": f"sum by (stage, topic) ({LAG})"},
        description="Records on a stage's input topic its consumer group has not committed. "
        "Growing: add replicas (up to the topic's partitions) or faster model servers.",
    ),
    panel(
        "Consumer lag by partition",
        {"{{stage}} <- {{topic}}[{{partition}}]": f"max by (stage, topic, partition) ({LAG})"},
        description="One partition far behind the others: a slow or stuck replica owns it.",
    ),
    panel(
        "Records pending in workers",
        {"{{stage}}": "sum by (stage) (promptcot_stage_pending_records)"},
        w=12,
        description="Received, not finished (in a model call or waiting for a batch).",
    ),
    panel(
        "Time since a stage last made progress",
        {
            "{{stage}}": "time() - max by (stage) "
            "(promptcot_stage_last_progress_timestamp_seconds)",
        },
        unit="s",
        w=12,
        description="With work pending and this above metrics.stall_after_s, /readyz fails and "
        "PromptCoTStageStalled fires.",
    ),
    row("Trainer"),
    panel(
        "Training loss per window",
        {"{{role}} {{step}}": "max by (role, step) (promptcot_trainer_loss)"},
        w=8,
    ),
    panel(
        "Held-out NLL (nats / token)",
        {"{{role}}": "max by (role) (promptcot_trainer_heldout_nll)"},
        w=8,
        description="p_θ's held-out problem NLL is the convergence signal of EM: it should fall.",
    ),
    panel(
        "Reward and margin",
        {
            "reward {{role}}": "max by (role) (promptcot_trainer_reward)",
            "margin {{role}}": "max by (role) (promptcot_trainer_margin)",
        },
        w=8,
        description="E-step: mean R(z) of q_φ's greedy rationales on held-out seeds "
        "(rationale_model). DPO: chosen minus rejected log-likelihood on held-out pairs (solver).",
    ),
    panel(
        "q_φ rationale length (tokens)",
        {"{{role}}": "max by (role) (promptcot_trainer_rationale_tokens)"},
        w=8,
        description="Mean length of q_φ's greedy rationales on held-out seeds after each "
        "E-step, beside its reward: a reward that rises as rationales shrink is 'shorter', "
        "not 'better'.",
    ),
    panel(
        "Model version per role",
        {
            "{{role}} newest": "max by (role) (promptcot_model_version)",
            "{{role}} oldest served": "min by (role) (promptcot_model_version)",
        },
        w=8,
        description="newest: announced by the trainer; oldest served: the process furthest "
        "behind. Apart for long: a worker missed a reload (see its `reload:` log lines).",
    ),
    panel(
        "Solver accuracy per version (eval)",
        {"{{benchmark}} {{version}}": "max by (benchmark, version) (promptcot_eval_accuracy)"},
        unit="percentunit",
        w=8,
        description="Share of a fixed benchmark subset solved by each solver version "
        "(trainer.eval after DPO, or `promptcot eval`); it should not fall below the base.",
    ),
    row("Latency and models"),
    panel(
        "Batch latency p50 / p95",
        {
            f"p{pct} {{{{stage}}}}": f"histogram_quantile({q}, sum by (le, stage) "
            f"(rate(promptcot_batch_seconds_bucket[{RI}])))"
            for pct, q in (("50", "0.5"), ("95", "0.95"))
        },
        unit="s",
    ),
    panel(
        "Mean micro-batch size",
        {
            "{{stage}}": f"sum by (stage) (rate(promptcot_batch_size_sum[{RI}])) / "
            f"clamp_min(sum by (stage) (rate(promptcot_batch_size_count[{RI}])), 1e-9)",
        },
    ),
    panel(
        "Model tokens per second",
        {
            "{{role}} {{kind}}": f"sum by (role, kind) (rate(promptcot_model_tokens_total[{RI}]))",
        },
    ),
    panel(
        "Solver pass rate (median)",
        {
            "{{domain}}": "histogram_quantile(0.5, sum by (le, domain) "
            f"(rate(promptcot_pass_rate_bucket[{RI}])))",
        },
        unit="percentunit",
    ),
    row("Verification and diversity"),
    panel(
        "Sandbox runs by outcome",
        {
            "{{outcome}}": f"sum by (outcome) (rate(promptcot_sandbox_runs_total[{RI}]))",
        },
    ),
    panel(
        "Diversity of accepted problems",
        {
            "{{measure}}": "avg by (measure) (promptcot_diversity)",
        },
    ),
    row("Drift of verified problems"),
    panel(
        "Diversity of verified problems",
        {"{{domain}}": "avg by (domain) (promptcot_accepted_diversity)"},
        w=8,
        description="Mean pairwise distance of the last verify.drift_window accepted problems "
        "(hashed word bigrams; 0 = all alike). PromptCoTDiversityFalling fires when it has "
        "fallen for an hour.",
    ),
    panel(
        "Length of verified problems (words)",
        {"{{domain}}": "avg by (domain) (promptcot_accepted_mean_words)"},
        w=8,
        description="Long self-play runs are reported to drift towards artificially long problems.",
    ),
    panel(
        "Trivial answers; designer-solver agreement",
        {
            "trivial or copied {{domain}}": "avg by (domain) "
            "(promptcot_accepted_trivial_answer_share)",
            "designer agrees {{domain}}": "avg by (domain) (promptcot_accepted_designer_agreement)",
        },
        unit="percentunit",
        w=8,
        description="Share of the last accepted problems whose reference is 0, 1 or a number "
        "the problem states; share whose solver plurality agrees with the designer's answer.",
    ),
]


def layout(panels: list[dict]) -> list[dict]:
    """Assign ids and positions left to right, top to bottom."""
    x = y = row_h = 0
    out = []
    for i, p in enumerate(panels, 1):
        p = {**p, "id": i}
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        row_h = max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
        out.append(p)
    return out


def dashboard() -> dict:
    return {
        "uid": "promptcot-factory",
        "title": "PromptCoT factory",
        "tags": ["promptcot"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "panels": layout(PANELS),
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
