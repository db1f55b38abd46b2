"""vectorstore: embeddings, the LanceDB problem store, dedup and benchmark decontamination.

Heavy imports (sentence-transformers, lancedb) stay in the submodules; import what you use:
    from vectorstore.dedup import DedupFilter, CandidateText, FilterDecision
"""
