"""OpenAI-compatible HTTP API (NIM-style) in front of Triton's `ensemble` model."""
