"""Learned reward models (the paper's sec. 6): VLM judges and the face-ID embedder."""
