"""Verification: the math check (answers, equivalence, voting), the sandbox that runs generated
code, and the code check built on it. A library: it imports the transport layer only, never the
model access (llm/) nor the stage runtime (workers/); docs/verification.md, docs/sandbox.md."""
