"""Inference on trained models: Select-then-Generate, a chat loop and an OpenAI-compatible server."""
