"""Build the Kubernetes manifests in ops/k8s/ from this file: plain YAML for `kubectl apply -f`.

    python ops/k8s/build_manifests.py      # rewrites ops/k8s/*.yaml

One declaration per stage (node kind, replicas, resources); what every worker shares (settings
from a ConfigMap, secrets from a Secret, probes, grace period, scrape annotations) is written
once below. ops/validate.sh checks the output against the Kubernetes schemas
(kubernetes-validate --strict); tests/test_deploy.py checks the files are what this writes and
that every setting they pass exists. README "From a laptop to a cluster" is the walk-through.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).parent
NS = "promptcot"
IMAGE = "promptcot-factory:0.1.0"  # ops/Dockerfile; push it and set your registry's name here
GPU_IMAGE = "promptcot-factory:0.1.0-gpu"  # --build-arg VARIANT=gpu
VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
METRICS_PORT = 9464
# The runtime drains for shutdown_grace_s (20 s by default) on SIGTERM: SIGKILL only after 30 s.
GRACE_S = 30
CONFIG_PATH = "/etc/promptcot/factory.yaml"

GPU_NODES = {
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}

# Settings of every worker (mounted as PROMPTCOT_CONFIG). Secrets are not here: the Secret
# promptcot-secrets gives PROMPTCOT_KAFKA__SASL_PASSWORD and the S3 keys as variables.
FACTORY_YAML = """\
kafka:
  bootstrap_servers: kafka-0.kafka:9093,kafka-1.kafka:9093,kafka-2.kafka:9093
  namespace: promptcot
  # A consumer group uses at most this many replicas of a stage (candidates keeps 1).
  partitions: 12
  replication_factor: 3
  security_protocol: SASL_SSL
  sasl_mechanism: SCRAM-SHA-512
  sasl_username: promptcot
  ssl_cafile: /etc/promptcot/kafka-ca/ca.pem
  session_timeout_s: 45
  heartbeat_interval_s: 10
models:
  # vLLM servers (30-model-servers.yaml), each serving its model under the role's name.
  prompt_model:
    {kind: openai, model: prompt_model, base_url: "http://vllm-prompt-model:8000/v1"}
  rationale_model:
    {kind: openai, model: rationale_model, base_url: "http://vllm-rationale-model:8000/v1"}
  solver: {kind: openai, model: solver, base_url: "http://vllm-solver:8000/v1", concurrency: 128}
  test_writer: {kind: openai, model: solver, base_url: "http://vllm-solver:8000/v1"}
  annotator: {kind: openai, model: annotator, base_url: "http://vllm-annotator:8000/v1"}
annotate:
  concept_source: model
vectorstore:
  store: {uri: "s3://promptcot/vectorstore"}  # LanceDB on S3: the filter and its standby share it
trainer:
  checkpoint_dir: /ckpt
log_level: INFO
"""


def meta(name: str, **labels: str) -> dict:
    return {"name": name, "namespace": NS, "labels": {"app.kubernetes.io/part-of": NS, **labels}}


def factory_container(
    name: str, args: list[str], *, image: str = IMAGE, env: dict | None = None, resources=None
) -> dict:
    probe = {"port": METRICS_PORT}
    return {
        "name": name,
        "image": image,
        "args": args,
        "env": [
            {"name": "PROMPTCOT_CONFIG", "value": CONFIG_PATH},
            {"name": "PROMPTCOT_METRICS__HOST", "value": "0.0.0.0"},
            {"name": "PROMPTCOT_METRICS__PORT", "value": str(METRICS_PORT)},
            *({"name": k, "value": v} for k, v in (env or {}).items()),
        ],
        "envFrom": [{"secretRef": {"name": "promptcot-secrets"}}],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        # Live: the process and its event loop answer (streams/health.py).
        "livenessProbe": {
            "httpGet": {"path": "/healthz", **probe},
            "periodSeconds": 15,
            "timeoutSeconds": 10,
            "failureThreshold": 4,
        },
        # Ready: stages started, and no stage holds pending input without progress for
        # metrics.stall_after_s.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", **probe},
            "periodSeconds": 15,
            "timeoutSeconds": 10,
            "failureThreshold": 2,
        },
        "resources": resources or {"requests": {"cpu": "1", "memory": "2Gi"}},
        "volumeMounts": [
            {
                "name": "config",
                "mountPath": "/etc/promptcot/factory.yaml",
                "subPath": "factory.yaml",
            },
            {"name": "kafka-ca", "mountPath": "/etc/promptcot/kafka-ca", "readOnly": True},
        ],
    }


FACTORY_VOLUMES = [
    {"name": "config", "configMap": {"name": "promptcot-config"}},
    {"name": "kafka-ca", "secret": {"secretName": "promptcot-kafka-ca"}},
]


def pod_template(app: str, containers: list[dict], volumes: list[dict], **spec) -> dict:
    return {
        "metadata": {
            "labels": {"app": app, "app.kubernetes.io/part-of": NS},
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(METRICS_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {
            "terminationGracePeriodSeconds": GRACE_S,
            "containers": containers,
            "volumes": volumes,
            **spec,
        },
    }


def worker(stage: str, replicas: int, *, doc: str, container: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**meta(stage, stage=stage), "annotations": {"promptcot/why": doc}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": stage}},
            "template": pod_template(
                stage,
                [container or factory_container(stage, ["worker", stage])],
                FACTORY_VOLUMES,
                **spec,
            ),
        },
    }


# Stage -> (replicas, why). Replicas beyond the input topic's partitions (kafka.partitions) idle.
STAGES = {
    "sampler": (
        1,
        "keeps sampler.max_in_flight concept sets in flight; a second sampler needs its own "
        "concepts.seed (its draws and consumer group are keyed by it), so run it as its own "
        "Deployment rather than a second replica",
    ),
    "annotate": (1, "cold-start annotation of seeds through the annotator server"),
    "rationale": (2, "K q_φ samples per seed, scored by p_θ: bound by the model servers"),
    "generate": (4, "p_θ writes candidates through vllm-prompt-model; scale with its GPUs"),
    "verify": (4, "solver rollouts and sandboxed tests: the most work per record"),
    "pairs": (1, "preference pairs from verdicts: cheap"),
    "traces": (1, "verified solutions from verdicts, for solver SFT: cheap"),
    "sink": (1, "problems topic + Parquet; idempotent by id"),
}


def stages() -> list[dict]:
    out = []
    for stage, (replicas, doc) in STAGES.items():
        container = factory_container(stage, ["worker", stage])
        if stage == "verify":
            # The sandbox for generated code (bwrap) needs user namespaces (verification/sandbox/):
            # the runtime default seccomp profile forbids them.
            container["securityContext"] = {
                "capabilities": {"add": ["SYS_ADMIN"]},
                "seccompProfile": {"type": "Unconfined"},
            }
        if stage == "sink":
            container["volumeMounts"].append(
                {"name": "output", "mountPath": "/work/promptcot-output"}
            )
            d = worker(stage, replicas, doc=doc, container=container)
            d["spec"]["template"]["spec"]["volumes"] = [
                *FACTORY_VOLUMES,
                {"name": "output", "persistentVolumeClaim": {"claimName": "promptcot-output"}},
            ]
            d["spec"]["strategy"] = {"type": "Recreate"}  # one writer of the Parquet folder
            out.append(d)
            continue
        out.append(worker(stage, replicas, doc=doc, container=container))
    return out


def filter_statefulsets() -> list[dict]:
    """candidates has one partition: the member holding it decides every near-duplicate
    (docs/vectorstore.md "Scaling out"). A StatefulSet of one never runs two pods of the same
    identity at once (a Deployment's rolling update would); the standby, on another node, is the
    second group member that takes the partition when the owner dies."""
    out = []
    for name in ("filter", "filter-standby"):
        out.append(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": meta(name, stage="filter"),
                "spec": {
                    "replicas": 1,
                    "serviceName": name,
                    "podManagementPolicy": "OrderedReady",
                    "selector": {"matchLabels": {"app": name}},
                    "template": pod_template(
                        name,
                        [
                            factory_container(
                                "filter",
                                ["worker", "filter"],
                                resources={"requests": {"cpu": "2", "memory": "4Gi"}},
                            )
                        ],
                        FACTORY_VOLUMES,
                        affinity={
                            "podAntiAffinity": {
                                "requiredDuringSchedulingIgnoredDuringExecution": [
                                    {
                                        "labelSelector": {"matchLabels": {"stage": "filter"}},
                                        "topologyKey": "kubernetes.io/hostname",
                                    }
                                ]
                            }
                        },
                    ),
                },
            }
        )
        out[-1]["spec"]["template"]["metadata"]["labels"]["stage"] = "filter"
        out.append(headless_service(name))
    return out


def headless_service(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name),
        "spec": {
            "clusterIP": "None",
            "selector": {"app": name},
            "ports": [{"name": "metrics", "port": METRICS_PORT}],
        },
    }


def trainer() -> list[dict]:
    """One em, one dpo and one sft, each on a GPU: em writes p_θ's and q_φ's checkpoints, dpo
    and sft take turns writing the solver's (a lock file in its checkpoint folder). The trainer
    loads the base weights itself (models.*.kind transformers on cuda), from the models
    volume."""
    out = []
    roles = {"em": ("prompt_model", "rationale_model"), "dpo": ("solver",), "sft": ("solver",)}
    for stage, stage_roles in roles.items():
        env = {"PROMPTCOT_METRICS__STALL_AFTER_S": "7200"}  # windows are long by design
        for role in stage_roles:
            key = f"PROMPTCOT_MODELS__{role.upper()}__"
            env[key + "KIND"] = "transformers"
            env[key + "MODEL"] = MODEL_SERVERS[SERVER_OF[role]][0]
            env[key + "DEVICE"] = "cuda"
        container = factory_container(
            stage,
            ["worker", stage],
            image=GPU_IMAGE,
            env=env,
            resources={
                "requests": {"cpu": "4", "memory": "32Gi"},
                "limits": {"nvidia.com/gpu": 1},
            },
        )
        container["volumeMounts"] += [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "checkpoints", "mountPath": "/ckpt"},
        ]
        d = worker(
            stage, 1, doc="trainer: windows -> checkpoints -> models topic", container=container
        )
        spec = d["spec"]["template"]["spec"]
        spec["volumes"] = [
            *FACTORY_VOLUMES,
            {"name": "models", "persistentVolumeClaim": {"claimName": "promptcot-models"}},
            {
                "name": "checkpoints",
                "persistentVolumeClaim": {"claimName": "promptcot-checkpoints"},
            },
        ]
        spec.update(GPU_NODES)
        d["spec"]["strategy"] = {"type": "Recreate"}  # never two trainers of one role
        out.append(d)
    return out


# Model server -> (base model folder on the models volume, served name, replicas). The served
# name never changes: a new version is the server restarted on another folder (MODEL_PATH),
# `kubectl set env deploy/vllm-prompt-model MODEL_PATH=/ckpt/prompt_model/v0007-m_step`.
MODEL_SERVERS = {
    "vllm-prompt-model": ("/models/p_theta", "prompt_model", 2),
    "vllm-rationale-model": ("/models/q_phi", "rationale_model", 1),
    "vllm-solver": ("/models/solver", "solver", 2),
    "vllm-annotator": ("/models/teacher", "annotator", 1),
}
SERVER_OF = {  # the roles the trainer trains -> the server of their base weights
    "prompt_model": "vllm-prompt-model",
    "rationale_model": "vllm-rationale-model",
    "solver": "vllm-solver",
}


def model_servers() -> list[dict]:
    out = []
    for name, (model, served, replicas) in MODEL_SERVERS.items():
        args = ["--model", "$(MODEL_PATH)", "--served-model-name", served, "--port", "8000"]
        env = [{"name": "MODEL_PATH", "value": model}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
        container = {
            "name": "vllm",
            "image": VLLM_IMAGE,
            "args": args,
            "env": env,
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": {
                "httpGet": {"path": "/health", "port": 8000},
                "periodSeconds": 10,
                "failureThreshold": 3,
            },
            "livenessProbe": {
                "httpGet": {"path": "/health", "port": 8000},
                "periodSeconds": 30,
                "timeoutSeconds": 10,
                "failureThreshold": 4,
            },
            "startupProbe": {  # loading weights and compiling takes minutes
                "httpGet": {"path": "/health", "port": 8000},
                "periodSeconds": 10,
                "failureThreshold": 90,
            },
            "resources": {
                "requests": {"cpu": "4", "memory": "32Gi"},
                "limits": {"nvidia.com/gpu": 1},
            },
            "volumeMounts": [
                {"name": "models", "mountPath": "/models", "readOnly": True},
                {"name": "checkpoints", "mountPath": "/ckpt", "readOnly": True},
                {"name": "shm", "mountPath": "/dev/shm"},
            ],
        }
        template = pod_template(
            name,
            [container],
            [
                {"name": "models", "persistentVolumeClaim": {"claimName": "promptcot-models"}},
                {
                    "name": "checkpoints",
                    "persistentVolumeClaim": {"claimName": "promptcot-checkpoints"},
                },
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
            ],
            **GPU_NODES,
        )
        template["metadata"]["annotations"]["prometheus.io/port"] = "8000"
        out.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta(name),
                "spec": {
                    "replicas": replicas,
                    # A new pod serves before an old one goes: no gap in a rollout.
                    "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                    "selector": {"matchLabels": {"app": name}},
                    "template": template,
                },
            }
        )
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta(name),
                "spec": {
                    "selector": {"app": name},
                    "ports": [{"name": "http", "port": 8000, "targetPort": 8000}],
                },
            }
        )
    return out


def config() -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta("promptcot-config"),
            "data": {"factory.yaml": FACTORY_YAML},
        },
        {
            # Placeholders: replace, or create it with `kubectl create secret generic`.
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta("promptcot-secrets"),
            "type": "Opaque",
            "stringData": {
                "PROMPTCOT_KAFKA__SASL_PASSWORD": "change-me",
                "AWS_ACCESS_KEY_ID": "change-me",
                "AWS_SECRET_ACCESS_KEY": "change-me",
                "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT": "http://minio.storage:9000",  # S3-compatible store; drop for AWS
                "AWS_ALLOW_HTTP": "true",
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta("promptcot-kafka-ca"),
            "type": "Opaque",
            "stringData": {
                "ca.pem": "-----BEGIN CERTIFICATE-----\nchange-me\n-----END CERTIFICATE-----\n"
            },
        },
    ]


def storage() -> list[dict]:
    def pvc(name: str, mode: str, size: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": meta(name),
            "spec": {"accessModes": [mode], "resources": {"requests": {"storage": size}}},
        }

    return [
        # Written by the trainer, read by every model server and worker: ReadWriteMany (NFS,
        # CephFS, EFS, Filestore...).
        pvc("promptcot-checkpoints", "ReadWriteMany", "500Gi"),
        pvc("promptcot-models", "ReadWriteMany", "500Gi"),  # base weights, filled by you
        pvc("promptcot-output", "ReadWriteOnce", "50Gi"),  # the sink's Parquet files
    ]


def topics_job() -> list[dict]:
    container = factory_container("topics", ["topics"])
    for key in ("livenessProbe", "readinessProbe", "ports"):
        del container[key]  # a job that exits: nothing to probe or scrape
    return [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta("promptcot-topics"),
            "spec": {
                "backoffLimit": 10,
                "template": {
                    "metadata": {"labels": {"app": "promptcot-topics"}},
                    "spec": {
                        "restartPolicy": "OnFailure",
                        "containers": [container],
                        "volumes": FACTORY_VOLUMES,
                    },
                },
            },
        }
    ]


FILES = {
    "00-config.yaml": ("Namespace, settings (ConfigMap) and secrets (Secret)", config),
    "10-storage.yaml": ("shared volumes: checkpoints, base models, sink output", storage),
    "20-topics.yaml": ("creates the topic catalogue (idempotent): `promptcot topics`", topics_job),
    "30-model-servers.yaml": (
        "vLLM OpenAI-compatible servers for the model roles, on GPUs",
        model_servers,
    ),
    "40-stages.yaml": ("one Deployment per stage, on CPU nodes", stages),
    "50-filter.yaml": ("the dedup owner and its standby", filter_statefulsets),
    "60-trainer.yaml": ("the trainer (em, dpo, sft), on GPUs", trainer),
}


def render(doc: str, objects: list[dict]) -> str:
    head = f"# {doc}.\n# Generated by ops/k8s/build_manifests.py: edit that file, then rerun it.\n"
    return head + "---\n".join(
        yaml.safe_dump(o, sort_keys=False, width=100, allow_unicode=True) for o in objects
    )


def manifests() -> dict[str, str]:
    return {name: render(doc, build()) for name, (doc, build) in FILES.items()}


if __name__ == "__main__":
    for name, text in manifests().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
