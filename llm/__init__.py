"""Model access: the backends (transformers, vLLM, OpenAI-compatible), the model roles and which
backend serves each, the prompt templates and their parsers, and the preparation of the embedded
SmolLM2 model. A library: it imports the transport layer only, never the stage runtime
(workers/); docs/models.md."""
