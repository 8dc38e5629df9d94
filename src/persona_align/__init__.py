"""persona-align: make dialogue models stay in character."""
