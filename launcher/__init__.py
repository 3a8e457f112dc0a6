"""Starts Triton and the OpenAI adapter as one service."""
