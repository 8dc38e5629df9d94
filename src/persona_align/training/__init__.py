"""Trainers: the NLI cross-encoder behind C and UE, and the alignment methods."""
