"""psamf: PSA-MF (Personality-Sentiment Aligned Multi-Level Fusion) trained and tuned on Ray."""

__version__ = "0.1.0"
