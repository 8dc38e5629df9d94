"""Inference on trained models: Select-then-Generate, chat, an OpenAI-compatible server."""
